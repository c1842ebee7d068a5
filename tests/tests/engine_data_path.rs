//! The data path between the two processes: a command on the Unix socket names a
//! shared-memory slot; the tensor goes control -> engine -> control through shm.

use std::time::Duration;

use neuroshard::supervisor::connect;
use neuroshard_proto::engine as pb;
use neuroshard_shared::shm::Segment;
use neuroshard_tests::{EngineProcess, wait_for};

#[test]
fn a_tensor_round_trips_through_shared_memory() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("engine.sock");
    let _engine = EngineProcess::start(&socket, &dir.path().join("engine.log")).unwrap();
    let name = format!("/nstest-path-{}", std::process::id());
    let (segment, _) = Segment::create(&name, 4, 1 << 20).unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = None;
        for _ in 0..300 {
            if let Ok(c) = connect(socket.clone()).await {
                client = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut client = client.expect("engine socket answers");
        client
            .attach(pb::AttachRequest {
                segment_name: name.clone(),
            })
            .await
            .unwrap();

        // Odd sizes, negative values, a non-trivial shape.
        let values: Vec<f32> = (0..3 * 7 * 5).map(|i| (i as f32 - 50.0) * 0.37).collect();
        let input = segment.write_f32(0, &[3, 7, 5], &values).unwrap();
        let reply = client
            .echo(pb::EchoRequest {
                input: Some(pb::TensorRef {
                    slot: input.slot,
                    seq: input.seq,
                }),
                output_slot: 1,
                scale: -2.0,
            })
            .await
            .unwrap()
            .into_inner();
        let out = reply.output.unwrap();
        let tensor = segment
            .read(neuroshard_shared::shm::TensorRef {
                slot: out.slot,
                seq: out.seq,
            })
            .unwrap();
        assert_eq!(tensor.shape, vec![3, 7, 5]);
        let expect: Vec<f32> = values.iter().map(|v| v * -2.0).collect();
        assert_eq!(tensor.to_f32().unwrap(), expect);

        // A stale reference and an out-of-range slot are refused with an error, not a crash.
        let stale = client
            .echo(pb::EchoRequest {
                input: Some(pb::TensorRef {
                    slot: input.slot,
                    seq: input.seq + 5,
                }),
                output_slot: 1,
                scale: 1.0,
            })
            .await
            .unwrap_err();
        assert_eq!(stale.code(), tonic::Code::InvalidArgument);
        let bad_slot = client
            .echo(pb::EchoRequest {
                input: Some(pb::TensorRef {
                    slot: input.slot,
                    seq: input.seq,
                }),
                output_slot: 99,
                scale: 1.0,
            })
            .await
            .unwrap_err();
        assert_eq!(bad_slot.code(), tonic::Code::InvalidArgument);
        // The engine is still there.
        client.health(pb::HealthRequest {}).await.unwrap();
    });
    wait_for(
        "socket exists",
        Duration::from_secs(1),
        Duration::from_millis(10),
        || socket.exists().then_some(()),
    )
    .unwrap();
}

//! Token embedding lookup: `out[r] = table[ids[r]]`.
//!
//! Ids come from data, so they are checked (all of them, before anything is written) and an
//! id at or above `V` returns [`KernelError::IdOutOfRange`] instead of panicking.

use crate::KernelError;

fn check_ids(ids: &[u32], v: usize) -> Result<(), KernelError> {
    match ids.iter().find(|&&id| id as usize >= v) {
        Some(&id) => Err(KernelError::IdOutOfRange { id, limit: v }),
        None => Ok(()),
    }
}

/// out [Bt,C] = table [V,C] rows picked by ids [Bt].
pub fn embedding_forward(
    out: &mut [f32],
    ids: &[u32],
    table: &[f32],
    c: usize,
) -> Result<(), KernelError> {
    assert!(
        c > 0 && table.len().is_multiple_of(c),
        "embedding: table is not [V, C]"
    );
    assert_eq!(out.len(), ids.len() * c, "embedding: out is not [Bt, C]");
    check_ids(ids, table.len() / c)?;
    for (row, &id) in out.chunks_exact_mut(c).zip(ids) {
        let id = id as usize;
        row.copy_from_slice(&table[id * c..(id + 1) * c]);
    }
    Ok(())
}

/// dtable [V,C] += scatter of dout [Bt,C] by ids [Bt].
pub fn embedding_backward(
    dtable: &mut [f32],
    dout: &[f32],
    ids: &[u32],
    c: usize,
) -> Result<(), KernelError> {
    assert!(
        c > 0 && dtable.len().is_multiple_of(c),
        "embedding: dtable is not [V, C]"
    );
    assert_eq!(dout.len(), ids.len() * c, "embedding: dout is not [Bt, C]");
    check_ids(ids, dtable.len() / c)?;
    for (drow, &id) in dout.chunks_exact(c).zip(ids) {
        let id = id as usize;
        for (dt, &d) in dtable[id * c..(id + 1) * c].iter_mut().zip(drow) {
            *dt += d;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::*;

    #[test]
    fn forward_picks_rows_and_backward_matches_finite_differences() {
        let mut r = rng(1);
        let (v, c) = (11, 5);
        let ids = [3u32, 0, 10, 3, 7, 7, 7];
        let table = rand_vec(&mut r, v * c, 1.0);
        let mut out = vec![0.0; ids.len() * c];
        embedding_forward(&mut out, &ids, &table, c).unwrap();
        for (row, &id) in ids.iter().enumerate() {
            let id = id as usize;
            assert_eq!(&out[row * c..(row + 1) * c], &table[id * c..(id + 1) * c]);
        }
        let w = rand_vec(&mut r, out.len(), 1.0);
        let mut dtable = vec![0.5; v * c];
        embedding_backward(&mut dtable, &w, &ids, c).unwrap();
        let ana: Vec<f32> = dtable.iter().map(|d| d - 0.5).collect();
        check_grad("dtable", &table, &ana, 1e-2, 1e-3, 1e-4, |t| {
            let mut o = vec![0.0; ids.len() * c];
            embedding_forward(&mut o, &ids, t, c).unwrap();
            dot64(&o, &w)
        });
    }

    #[test]
    fn out_of_range_id_is_an_error_and_writes_nothing() {
        let table = vec![1.0; 4 * 2];
        let mut out = vec![0.0; 3 * 2];
        let err = embedding_forward(&mut out, &[1, 4, 0], &table, 2).unwrap_err();
        assert_eq!(err, KernelError::IdOutOfRange { id: 4, limit: 4 });
        assert!(out.iter().all(|&x| x == 0.0));
        let mut dtable = vec![0.0; 4 * 2];
        let err = embedding_backward(&mut dtable, &out, &[0, 1, 99], 2).unwrap_err();
        assert_eq!(err, KernelError::IdOutOfRange { id: 99, limit: 4 });
        assert!(dtable.iter().all(|&x| x == 0.0));
    }
}

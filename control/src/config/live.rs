//! The live configuration: one `watch` channel of `Arc<Config>`. Its one sender belongs to
//! the API (`PATCH /api/v1/config` replaces the value after saving the file); every reader —
//! the trainer, the pipeline stage, the proof minter, the handlers — holds a [`LiveConfig`].
//! A reader gets the whole config of one moment (never a default in place of it), and can
//! wait for the next change instead of polling.

use std::sync::Arc;

use tokio::sync::watch;

use super::Config;

/// Where the live configuration is written: the sender of the channel.
pub type ConfigSender = watch::Sender<Arc<Config>>;

/// A reader of the live configuration. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LiveConfig(watch::Receiver<Arc<Config>>);

impl LiveConfig {
    /// A channel holding `config`: its sender, for the one writer, and a reader.
    pub fn channel(config: Config) -> (ConfigSender, LiveConfig) {
        let (tx, rx) = watch::channel(Arc::new(config));
        (tx, LiveConfig(rx))
    }

    /// The configuration now.
    pub fn get(&self) -> Arc<Config> {
        self.0.borrow().clone()
    }

    /// Resolves when a new configuration has been published since this handle last waited;
    /// never once the writer is gone (nothing can change any more).
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl From<&ConfigSender> for LiveConfig {
    fn from(tx: &ConfigSender) -> LiveConfig {
        LiveConfig(tx.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_see_what_the_writer_publishes_and_wake_on_it() {
        let (tx, live) = LiveConfig::channel(Config::default());
        let mut waiting = live.clone();
        assert_eq!(live.get().training.batch_size, 8);
        tx.send_modify(|c| Arc::make_mut(c).training.batch_size = 16);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting.changed())
            .await
            .expect("a change wakes the reader");
        assert_eq!(live.get().training.batch_size, 16);
        assert_eq!(waiting.get().training.batch_size, 16);
    }

    #[tokio::test]
    async fn without_a_writer_nothing_changes() {
        let (tx, mut live) = LiveConfig::channel(Config::default());
        drop(tx);
        let woke = tokio::time::timeout(std::time::Duration::from_millis(50), live.changed());
        assert!(
            woke.await.is_err(),
            "a reader never wakes once the writer is gone"
        );
        assert_eq!(*live.get(), Config::default());
    }
}

//! A handle on a service serving in its own task: the address it answers on, and a wait
//! that reports a task that panicked or was cancelled as the service's own error, so
//! every service's `start`/`wait` pair behaves the same.

use std::future::Future;
use std::net::SocketAddr;

use tokio::task::JoinHandle;

/// A service running in a spawned task that ends with `Result<(), E>`.
#[derive(Debug)]
pub struct Served<E> {
    addr: SocketAddr,
    task: JoinHandle<Result<(), E>>,
}

impl<E: Send + 'static> Served<E> {
    /// Spawns `serving` (which ends after the shutdown signal and the drain) for the
    /// service answering on `addr`.
    pub fn spawn<F>(addr: SocketAddr, serving: F) -> Self
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        Served {
            addr,
            task: tokio::spawn(serving),
        }
    }

    /// The address the service answers on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until the service has stopped. A task that ended abnormally (panicked or
    /// was cancelled) becomes `abnormal(description)`.
    pub async fn wait(self, abnormal: impl FnOnce(String) -> E) -> Result<(), E> {
        self.task
            .await
            .map_err(|e| abnormal(e.to_string()))
            .and_then(|r| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8080))
    }

    #[tokio::test]
    async fn wait_returns_the_task_result() {
        let ok: Served<String> = Served::spawn(addr(), async { Ok(()) });
        assert_eq!(ok.local_addr(), addr());
        assert_eq!(ok.wait(|e| e).await, Ok(()));
        let failed: Served<String> = Served::spawn(addr(), async { Err("boom".to_string()) });
        assert_eq!(failed.wait(|e| e).await, Err("boom".to_string()));
    }

    #[tokio::test]
    async fn a_panicked_task_becomes_the_abnormal_error() {
        let served: Served<String> = Served::spawn(addr(), async { panic!("task blew up") });
        let err = served.wait(|e| format!("abnormal: {e}")).await.unwrap_err();
        assert!(err.starts_with("abnormal: "), "{err}");
        assert!(err.contains("panicked"), "{err}");
    }
}

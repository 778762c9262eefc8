//! The smallest HTTP endpoint that Prometheus can scrape: `GET /metrics`
//! answers with whatever `render` returns, anything else gets 404. Shared by
//! the proxy and the rebalancer daemons.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves until the task is dropped.
pub async fn serve<F>(listener: TcpListener, render: F)
where
    F: Fn() -> String + Clone + Send + 'static,
{
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let n = match tokio::time::timeout(
                std::time::Duration::from_secs(5),
                stream.read(&mut request),
            )
            .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let response = if request[..n].starts_with(b"GET /metrics") {
                let body = render();
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string()
            };
            if let Err(e) = stream.write_all(response.as_bytes()).await {
                tracing::debug!(error = %e, "metrics response failed");
            }
        });
    }
}

//! The two things the tool asks Redis: delete a run's keys (its unique
//! BUCKET_REDIS_PREFIX) and the redis-server pid (for the store's CPU). A
//! few lines of RESP rather than a client crate for two commands.
use std::future::Future;
use std::pin::Pin;

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Debug)]
enum Reply {
    Text(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

struct Conn {
    io: BufReader<TcpStream>,
}

impl Conn {
    /// redis://[[user]:password@]host[:port][/db]
    async fn open(url: &str) -> Result<Self> {
        let u = reqwest::Url::parse(url).with_context(|| format!("Redis URL {url}"))?;
        let host = u.host_str().unwrap_or("127.0.0.1");
        let port = u.port().unwrap_or(6379);
        let tcp = TcpStream::connect((host, port))
            .await
            .with_context(|| format!("connecting to Redis at {host}:{port}"))?;
        let mut conn = Self {
            io: BufReader::new(tcp),
        };
        if let Some(password) = u.password() {
            let user = if u.username().is_empty() {
                "default"
            } else {
                u.username()
            };
            conn.cmd(&["AUTH", user, password]).await?;
        }
        let db = u.path().trim_start_matches('/');
        if !db.is_empty() {
            conn.cmd(&["SELECT", db]).await?;
        }
        Ok(conn)
    }

    async fn cmd(&mut self, args: &[&str]) -> Result<Reply> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.io.get_mut().write_all(&out).await?;
        self.read().await
    }

    async fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.io.read_line(&mut line).await? == 0 {
            bail!("Redis closed the connection");
        }
        Ok(line.trim_end_matches("\r\n").to_owned())
    }

    // Boxed: arrays nest, and an async fn cannot recurse unboxed.
    fn read(&mut self) -> Pin<Box<dyn Future<Output = Result<Reply>> + Send + '_>> {
        Box::pin(async move {
            let line = self.line().await?;
            let (kind, rest) = line.split_at(1.min(line.len()));
            match kind {
                "+" => Ok(Reply::Text(rest.to_owned())),
                "-" => Err(anyhow!("Redis: {rest}")),
                ":" => Ok(Reply::Int(rest.parse()?)),
                "$" => {
                    let len: i64 = rest.parse()?;
                    if len < 0 {
                        return Ok(Reply::Bulk(None));
                    }
                    let mut buf = vec![0; len as usize + 2];
                    self.io.read_exact(&mut buf).await?;
                    buf.truncate(len as usize);
                    Ok(Reply::Bulk(Some(buf)))
                }
                "*" => {
                    let n: i64 = rest.parse()?;
                    let mut items = Vec::new();
                    for _ in 0..n.max(0) {
                        items.push(self.read().await?);
                    }
                    Ok(Reply::Array(items))
                }
                _ => Err(anyhow!("unexpected Redis reply {line:?}")),
            }
        })
    }
}

fn text(r: &Reply) -> Option<String> {
    match r {
        Reply::Text(s) => Some(s.clone()),
        Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        Reply::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Deletes every key starting with `prefix`; returns how many.
pub async fn delete_prefix(url: &str, prefix: &str) -> Result<u64> {
    let mut conn = Conn::open(url).await?;
    let pattern = format!("{prefix}*");
    let mut cursor = "0".to_owned();
    let mut deleted = 0;
    loop {
        let reply = conn
            .cmd(&["SCAN", &cursor, "MATCH", &pattern, "COUNT", "1000"])
            .await?;
        let Reply::Array(parts) = reply else {
            bail!("SCAN answered {reply:?}");
        };
        let [next, Reply::Array(keys)] = &parts[..] else {
            bail!("SCAN answered {parts:?}");
        };
        let keys: Vec<String> = keys.iter().filter_map(text).collect();
        if !keys.is_empty() {
            let mut args = vec!["DEL"];
            args.extend(keys.iter().map(String::as_str));
            if let Reply::Int(n) = conn.cmd(&args).await? {
                deleted += n as u64;
            }
        }
        cursor = text(next).unwrap_or_else(|| "0".into());
        if cursor == "0" {
            return Ok(deleted);
        }
    }
}

/// The redis-server's pid, from INFO server.
pub async fn server_pid(url: &str) -> Result<u32> {
    let mut conn = Conn::open(url).await?;
    let info = text(&conn.cmd(&["INFO", "server"]).await?).unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| anyhow!("INFO server has no process_id"))
}

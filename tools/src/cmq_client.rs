//! A small CMQ HTTP client (one keep-alive HTTP/1.1 connection, plain TCP) for `meridian bench`:
//! it signs requests the way Tencent's SDKs do, so the bench exercises the same path they do.

use anyhow::{anyhow, bail, Context};
use meridian_api::cmq_http::sign_form;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct CmqHttp {
    addr: String,
    secret_id: String,
    secret_key: String,
    conn: Option<BufReader<TcpStream>>,
}

/// A CMQ reply: its code and the whole JSON.
pub struct CmqReply {
    pub code: u32,
    pub body: Value,
}

impl CmqHttp {
    /// `endpoint` is `http://host:port` (HTTPS is not supported by this client).
    pub fn new(endpoint: &str, secret_id: &str, secret_key: &str) -> anyhow::Result<Self> {
        let addr = endpoint
            .strip_prefix("http://")
            .ok_or_else(|| {
                anyhow!("the bench's HTTP client needs an http:// endpoint, got {endpoint:?}")
            })?
            .trim_end_matches('/')
            .to_string();
        Ok(Self {
            addr,
            secret_id: secret_id.into(),
            secret_key: secret_key.into(),
            conn: None,
        })
    }

    /// Calls one action; reconnects once if the kept-alive connection was closed.
    pub async fn call(&mut self, params: &[(&str, &str)]) -> anyhow::Result<CmqReply> {
        match self.try_call(params).await {
            Ok(r) => Ok(r),
            Err(_) => {
                self.conn = None;
                self.try_call(params).await
            }
        }
    }

    async fn try_call(&mut self, params: &[(&str, &str)]) -> anyhow::Result<CmqReply> {
        if self.conn.is_none() {
            let s = TcpStream::connect(&self.addr)
                .await
                .with_context(|| format!("connect {}", self.addr))?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let body = sign_form(
            params,
            &self.secret_id,
            &self.secret_key,
            "POST",
            &self.addr,
            "/",
            now,
            rand::random::<u64>() >> 1,
        );
        let conn = self.conn.as_mut().expect("connected above");
        let head = format!(
            "POST / HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n",
            self.addr,
            body.len()
        );
        conn.get_mut().write_all(head.as_bytes()).await?;
        conn.get_mut().write_all(body.as_bytes()).await?;
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            bail!("connection closed");
        }
        let mut len = None;
        loop {
            let mut h = String::new();
            conn.read_line(&mut h).await?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = Some(v.trim().parse::<usize>()?);
                }
            }
        }
        let mut buf = vec![0; len.ok_or_else(|| anyhow!("reply without Content-Length"))?];
        conn.read_exact(&mut buf).await?;
        let body: Value = serde_json::from_slice(&buf)?;
        let code = body["code"]
            .as_u64()
            .ok_or_else(|| anyhow!("reply without integer code"))? as u32;
        Ok(CmqReply { code, body })
    }
}

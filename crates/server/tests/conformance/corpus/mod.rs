//! The corpus: request sequences over the data API and the control API, run unchanged against
//! both servers. Invalid requests are the larger part, because clients and orchestrators
//! branch on error answers as much as on successes.
//!
//! The cases live in [`images`] (read side of the data API), [`uploads`] (write side) and
//! [`tickets`] (control API).
//!
//! Every case starts from the same state on both servers (all tickets deleted, the image
//! rewritten, tickets `rw` (write) and `ro` (read) for the whole image installed); those
//! prelude steps are compared like every other step. `{url}` in a target or body is replaced
//! by the side's backend URL, `{size}` by the image size.

mod images;
mod tickets;
mod uploads;

/// Size of the image every case starts from.
pub const IMAGE_SIZE: u64 = 1 << 20;
/// Pseudo-random bytes at the start of the image; the rest is a hole.
pub const IMAGE_DATA: usize = 300_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Svc {
    Data,
    Control,
}

/// How the request states its body length.
#[derive(Debug, Clone)]
pub enum Length {
    /// `Content-Length` of the body as sent (omitted for bodiless GET/OPTIONS/DELETE).
    Auto,
    /// No `Content-Length` at all.
    Omit,
    /// This literal value (malformed, lying or duplicated).
    Literal(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Step {
    pub svc: Svc,
    /// Connection index within the case; steps on one index share a connection.
    pub conn: usize,
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub length: Length,
    pub half_close: bool,
}

impl Step {
    pub fn h(mut self, name: &str, value: &str) -> Step {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Step {
        self.body = b.into();
        self
    }
    pub fn json(self, text: &str) -> Step {
        self.body(text.as_bytes().to_vec())
    }
    pub fn length(mut self, values: &[&str]) -> Step {
        self.length = Length::Literal(values.iter().map(|s| s.to_string()).collect());
        self
    }
    pub fn no_length(mut self) -> Step {
        self.length = Length::Omit;
        self
    }
    pub fn conn(mut self, c: usize) -> Step {
        self.conn = c;
        self
    }
    pub fn half_close(mut self) -> Step {
        self.half_close = true;
        self
    }

    /// The request bytes, with `{url}` and `{size}` substituted.
    pub fn render(&self, url: &str) -> Vec<u8> {
        let sub = |s: &str| {
            s.replace("{url}", url)
                .replace("{size}", &IMAGE_SIZE.to_string())
        };
        let body = sub(&String::from_utf8_lossy(&self.body)).into_bytes();
        let body = if self.body.is_ascii() {
            body
        } else {
            self.body.clone()
        };
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\n",
            self.method,
            sub(&self.target)
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        match &self.length {
            Length::Auto => {
                if !body.is_empty() || ["PUT", "PATCH", "POST"].contains(&self.method.as_str()) {
                    out.push_str(&format!("Content-Length: {}\r\n", body.len()));
                }
            }
            Length::Omit => {}
            Length::Literal(values) => {
                for v in values {
                    out.push_str(&format!("Content-Length: {v}\r\n"));
                }
            }
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&body);
        bytes
    }
}

pub struct Case {
    pub name: String,
    pub steps: Vec<Step>,
}

fn step(svc: Svc, method: &str, target: &str) -> Step {
    Step {
        svc,
        conn: 0,
        method: method.into(),
        target: target.into(),
        headers: Vec::new(),
        body: Vec::new(),
        length: Length::Auto,
        half_close: false,
    }
}

pub fn data(method: &str, target: &str) -> Step {
    step(Svc::Data, method, target)
}

pub fn ctl(method: &str, target: &str) -> Step {
    step(Svc::Control, method, target)
}

/// `PUT /tickets/ID` with a ticket for the case's image; `size` and `extra` are JSON text.
pub fn add(id: &str, ops: &str, size: &str, extra: &str) -> Step {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    ctl("PUT", &format!("/tickets/{id}")).json(&format!(
        r#"{{"uuid": "{id}", "size": {size}, "ops": {ops}, "timeout": 300, "url": "{{url}}"{extra}}}"#
    ))
}

/// The steps every case starts with.
pub fn prelude() -> Vec<Step> {
    vec![
        ctl("DELETE", "/tickets/"),
        add("rw", r#"["write"]"#, "{size}", ""),
        add("ro", r#"["read"]"#, "{size}", ""),
    ]
}

pub(crate) fn put(target: &str, body: Vec<u8>) -> Step {
    data("PUT", target).body(body)
}

pub(crate) fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub(crate) fn patch(target: &str, json: &str) -> Step {
    data("PATCH", target).json(json)
}

/// The whole corpus, in a fixed order.
pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let mut case = |name: &str, steps: Vec<Step>| {
        out.push(Case {
            name: name.to_string(),
            steps,
        })
    };
    images::cases(&mut case);
    uploads::cases(&mut case);
    tickets::cases(&mut case);
    out
}

//! The smallest XMPP client the side-by-side benchmark needs (RFC 6120 c2s on loopback, no TLS):
//! in-band registration (XEP-0077), SASL PLAIN, resource binding, presence, and
//! `<message type='chat'>` stanzas. The XML is read by quick-xml; this module only tracks
//! which elements are stanzas (children of the stream) and what they carry.

use anyhow::{bail, Context};
use base64::Engine as _;
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use std::net::SocketAddr;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// A top-level element of the stream: its name, attributes, and the local names of every
/// element inside it (enough to tell `<iq type='error'><conflict/>` from success).
#[derive(Debug, Default)]
pub struct Stanza {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub inner: Vec<String>,
}

impl Stanza {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn contains(&self, local_name: &str) -> bool {
        self.inner.iter().any(|n| n == local_name)
    }
}

/// Reads stanzas off a stream, one at a time.
pub struct StanzaReader {
    xml: Reader<BufReader<OwnedReadHalf>>,
    buf: Vec<u8>,
}

/// Largest stanza the reader accepts.
const MAX_STANZA: usize = 256 * 1024;

fn local_name(e: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(e.local_name().as_ref()).into_owned()
}

fn qualified_name(e: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(e.name().as_ref()).into_owned()
}

impl StanzaReader {
    fn new(read: OwnedReadHalf) -> Self {
        let mut xml = Reader::from_reader(BufReader::with_capacity(16 * 1024, read));
        // A restarted stream opens a second <stream:stream> that the first never closes.
        xml.config_mut().check_end_names = false;
        Self {
            xml,
            buf: Vec::with_capacity(4096),
        }
    }

    /// The next stanza; stream headers (also after a restart) are skipped.
    pub async fn next(&mut self) -> anyhow::Result<Stanza> {
        let mut stanza: Option<Stanza> = None;
        let mut depth = 0usize;
        let mut started = self.xml.buffer_position();
        loop {
            self.buf.clear();
            let event = self
                .xml
                .read_event_into_async(&mut self.buf)
                .await
                .context("the XMPP stream is not well-formed XML")?;
            let position = self.xml.buffer_position();
            if stanza.is_some() && position.saturating_sub(started) > MAX_STANZA as u64 {
                bail!("a stanza over {MAX_STANZA} bytes");
            }
            match event {
                Event::Start(e) if qualified_name(&e) == "stream:stream" => continue,
                Event::Start(ref e) | Event::Empty(ref e) if stanza.is_none() => {
                    let empty = matches!(event, Event::Empty(_));
                    let mut s = Stanza {
                        name: local_name(e),
                        ..Default::default()
                    };
                    for a in e.attributes().flatten() {
                        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
                        let value = a
                            .decode_and_unescape_value(self.xml.decoder())
                            .map(|v| v.into_owned())
                            .unwrap_or_default();
                        s.attrs.push((key, value));
                    }
                    if empty {
                        return Ok(s);
                    }
                    stanza = Some(s);
                    depth = 1;
                    started = position;
                }
                Event::Start(e) => {
                    depth += 1;
                    if let Some(s) = stanza.as_mut() {
                        s.inner.push(local_name(&e));
                    }
                }
                Event::Empty(e) => {
                    if let Some(s) = stanza.as_mut() {
                        s.inner.push(local_name(&e));
                    }
                }
                Event::End(e) => {
                    if stanza.is_none() {
                        bail!(
                            "the server closed the XMPP stream ({})",
                            String::from_utf8_lossy(e.name().as_ref())
                        );
                    }
                    depth -= 1;
                    if depth == 0 {
                        return stanza.context("no stanza");
                    }
                }
                Event::Eof => bail!("the server hung up"),
                _ => {}
            }
        }
    }
}

/// One logged-in c2s session, split into its two directions.
pub struct Session {
    pub reader: StanzaReader,
    pub writer: BufWriter<OwnedWriteHalf>,
    /// The full JID the server bound.
    pub jid: String,
}

fn stream_header(domain: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{}' xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>",
        escape(domain)
    )
}

/// XML-escapes text for an attribute value or element content.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(text)
}

async fn send(writer: &mut BufWriter<OwnedWriteHalf>, xml: &str) -> anyhow::Result<()> {
    writer.write_all(xml.as_bytes()).await?;
    writer.flush().await?;
    Ok(())
}

/// Opens a stream and reads the server's features.
async fn open(addr: SocketAddr, domain: &str) -> anyhow::Result<Session> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach the XMPP server at {addr}"))?;
    tcp.set_nodelay(true)?;
    let (read, write) = tcp.into_split();
    let mut session = Session {
        reader: StanzaReader::new(read),
        writer: BufWriter::with_capacity(16 * 1024, write),
        jid: String::new(),
    };
    send(&mut session.writer, &stream_header(domain)).await?;
    let features = session.reader.next().await?;
    if features.name != "features" {
        bail!("expected stream features, got <{}>", features.name);
    }
    Ok(session)
}

/// Registers `user` in band; an account that already exists is fine.
pub async fn register(
    addr: SocketAddr,
    domain: &str,
    user: &str,
    password: &str,
) -> anyhow::Result<()> {
    let mut s = open(addr, domain).await?;
    let iq = format!(
        "<iq type='set' id='reg'><query xmlns='jabber:iq:register'><username>{}</username>\
         <password>{}</password></query></iq>",
        escape(user),
        escape(password)
    );
    send(&mut s.writer, &iq).await?;
    let answer = s.reader.next().await?;
    match answer.attr("type") {
        Some("result") => Ok(()),
        Some("error") if answer.contains("conflict") => Ok(()),
        _ => bail!(
            "registering {user}@{domain} failed (is in-band registration on?): {:?}",
            answer.inner
        ),
    }
}

/// Logs `user` in with SASL PLAIN and binds resource `resource`.
pub async fn login(
    addr: SocketAddr,
    domain: &str,
    user: &str,
    password: &str,
    resource: &str,
) -> anyhow::Result<Session> {
    let mut s = open(addr, domain).await?;
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    send(
        &mut s.writer,
        &format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{plain}</auth>"),
    )
    .await?;
    let answer = s.reader.next().await?;
    if answer.name != "success" {
        bail!(
            "SASL PLAIN login of {user}@{domain} failed: <{}> {:?}",
            answer.name,
            answer.inner
        );
    }
    send(&mut s.writer, &stream_header(domain)).await?;
    let features = s.reader.next().await?;
    if !features.contains("bind") {
        bail!("the server offers no resource binding after login");
    }
    send(
        &mut s.writer,
        &format!(
            "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
             <resource>{}</resource></bind></iq>",
            escape(resource)
        ),
    )
    .await?;
    let bound = s.reader.next().await?;
    if bound.attr("type") != Some("result") {
        bail!(
            "binding a resource for {user}@{domain} failed: {:?}",
            bound.inner
        );
    }
    s.jid = format!("{user}@{domain}/{resource}");
    Ok(s)
}

impl Session {
    /// Announces the session available, so messages to the bare JID are delivered to it
    /// rather than stored offline.
    pub async fn available(&mut self) -> anyhow::Result<()> {
        send(&mut self.writer, "<presence/>").await
    }
}

/// A `<message type='chat'>` to `to` with id `id` and body `body`, as the sender writes it.
pub fn chat_message(to: &str, id: u64, body: &str) -> String {
    format!(
        "<message type='chat' to='{}' id='{id}'><body>{}</body></message>",
        escape(to),
        escape(body)
    )
}

//! The SSRF guard: webhook URLs must not reach the server's own network. A host is refused
//! when any address it resolves to is internal (loopback, private, link-local, cloud metadata,
//! …), unless the operator's allow list names it. The same rule runs at Submit and again at
//! every delivery, inside the HTTP client's DNS resolver, so a name that later resolves
//! elsewhere (DNS rebinding) still cannot reach an internal address.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use reqwest::Url;

/// Whether `ip` is an address a webhook must never reach (without an allow-list entry):
/// unspecified, loopback, private (RFC 1918), shared/CGNAT (100.64.0.0/10), link-local
/// (including the 169.254.169.254 metadata service), IETF protocol assignments, benchmarking,
/// documentation, reserved, multicast and broadcast IPv4 ranges; and for IPv6 unspecified,
/// loopback, unique-local (fc00::/7, including the fd00:ec2::254 metadata service),
/// link-local (fe80::/10), site-local, multicast, documentation, discard-only, local-use NAT64
/// (64:ff9b:1::/48), Teredo (2001::/32), and the NAT64 (64:ff9b::/96), 6to4 (2002::/16),
/// IPv4-mapped, -translated or -compatible forms of any internal IPv4.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (b & 0xc0) == 64) // shared address space (CGNAT), 100.64.0.0/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments, 192.0.0.0/24
        || (a == 198 && (b & 0xfe) == 18) // benchmarking, 198.18.0.0/15
        || a >= 240 // reserved, 240.0.0.0/4
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_internal_v4(v4);
    }
    let segments = ip.segments();
    // IPv4-translated (SIIT, ::ffff:0:a.b.c.d) reaches the embedded IPv4 address too.
    if segments[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return is_internal_v4(ipv4_in(segments[6], segments[7]));
    }
    // IPv4-compatible (::a.b.c.d, deprecated but still routed by some stacks).
    if segments[..6].iter().all(|s| *s == 0) {
        let v4 = ipv4_in(segments[6], segments[7]);
        return ip.is_unspecified() || ip.is_loopback() || is_internal_v4(v4);
    }
    // NAT64 (64:ff9b::/96) reaches the embedded IPv4 address.
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_internal_v4(ipv4_in(segments[6], segments[7]));
    }
    // 6to4 (2002::/16) carries its relay's IPv4 address in the next 32 bits: a gateway that
    // decapsulates it reaches that address.
    if segments[0] == 0x2002 {
        return is_internal_v4(ipv4_in(segments[1], segments[2]));
    }
    ip.is_multicast()
        // Local-use NAT64 (64:ff9b:1::/48): where the IPv4 address sits depends on the site's
        // prefix length, so the whole range is refused rather than guessed at.
        || segments[..3] == [0x64, 0xff9b, 1]
        // Teredo (2001::/32) tunnels to an IPv4 server and an obfuscated IPv4 client.
        || (segments[0] == 0x2001 && segments[1] == 0)
        || (segments[0] & 0xfe00) == 0xfc00 // unique local, fc00::/7
        || (segments[0] & 0xffc0) == 0xfe80 // link-local, fe80::/10
        || (segments[0] & 0xffc0) == 0xfec0 // site-local (deprecated), fec0::/10
        || (segments[0] == 0x2001 && segments[1] == 0x0db8) // documentation, 2001:db8::/32
        || segments[..4] == [0x100, 0, 0, 0] // discard-only, 100::/64
}

/// The IPv4 address written as two 16-bit IPv6 segments.
fn ipv4_in(high: u16, low: u16) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(high) << 16) | u32::from(low))
}

/// The hosts an operator lets webhooks reach even though they resolve to internal addresses:
/// entries are exact host names or IP literals (`hooks.internal`, `127.0.0.1`, `[::1]`),
/// optionally with a port (`127.0.0.1:8080`) to open that port only.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    entries: BTreeSet<String>,
}

impl AllowList {
    /// An allow list of `entries`, each in the form a URL parser gives its host (lowercase,
    /// `127.1` as `127.0.0.1`), so that it matches however a URL writes the host. An entry
    /// [`allow_entry`] refuses matches nothing (`serve` refuses to start with one).
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(entries: I) -> Self {
        Self {
            entries: entries
                .into_iter()
                .filter_map(|e| allow_entry(e.as_ref()).ok())
                .collect(),
        }
    }

    /// Whether `host` (as a URL writes it, IPv6 in brackets) on `port` is allowed.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        self.entries.contains(&host) || self.entries.contains(&format!("{host}:{port}"))
    }

    /// Whether some entry names `host` (on any port): what a DNS resolver, which never sees
    /// the port, can check. The port itself was checked before the request was made.
    pub fn allows_name(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.entries.iter().any(|entry| {
            entry == &host
                || entry
                    .rsplit_once(':')
                    .is_some_and(|(h, port)| h == host && port.parse::<u16>().is_ok())
        })
    }
}

/// An allow-list entry in the form the list compares: a host name, an IPv4 literal or a
/// bracketed IPv6 literal, as a URL parser writes it, then `:port` if the entry names one.
/// Anything else (a scheme, a path, an unbracketed IPv6 address, a bad port) is refused with
/// why: it could never match a URL's host, and an operator who wrote it meant something.
pub fn allow_entry(entry: &str) -> Result<String, String> {
    let entry = entry.trim();
    if entry.contains('/') {
        return Err(format!(
            "{entry:?} is not a host: write the host alone, without a scheme or path"
        ));
    }
    let (host, port) = match entry.rsplit_once(':') {
        // An IPv6 literal's own colons are inside its brackets.
        Some((host, port)) if !entry.ends_with(']') => (host, Some(port)),
        _ => (entry, None),
    };
    if host.is_empty() {
        return Err(format!("{entry:?} names no host"));
    }
    let parsed = url::Host::parse(host).map_err(|e| {
        let hint = if host.contains(':') && !host.starts_with('[') {
            " (write an IPv6 address in brackets, as [::1])"
        } else {
            ""
        };
        format!("{entry:?} is not a host name or IP address: {e}{hint}")
    })?;
    let host = parsed.to_string().to_ascii_lowercase();
    match port {
        None => Ok(host),
        Some(port) => match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(format!("{host}:{port}")),
            _ => Err(format!("{entry:?} has no valid port (1 to 65535)")),
        },
    }
}

/// Why a webhook URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefused {
    /// Not a usable absolute http(s) URL.
    #[error("{0}")]
    Malformed(String),
    /// The host resolves to an internal address.
    #[error(
        "{} an internal address (loopback, private, link-local or metadata); webhooks may not \
         reach it unless the server's [webhooks] allow_hosts lists the host",
        resolves_to(host, ip)
    )]
    Internal {
        /// The host as written.
        host: String,
        /// The offending address.
        ip: IpAddr,
    },
    /// The host resolves to an internal address, and the server's allow list names the host
    /// only with other ports.
    #[error(
        "{} an internal address, and the server's [webhooks] allow_hosts lists {host} only with \
         other ports; webhooks may reach port {port} once it lists {host}:{port} (or {host}, \
         for every port)",
        resolves_to(host, ip)
    )]
    PortNotAllowed {
        /// The host as written.
        host: String,
        /// The port the URL names (or its scheme's default).
        port: u16,
        /// The offending address.
        ip: IpAddr,
    },
    /// The host could not be resolved.
    #[error("{host} cannot be resolved: {reason}")]
    Unresolved {
        /// The host as written.
        host: String,
        /// Why.
        reason: String,
    },
}

/// `10.0.0.1 is 10.0.0.1` reads badly: say "resolves to" only for names.
fn resolves_to(host: &str, ip: &IpAddr) -> String {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        format!("{host} is")
    } else {
        format!("{host} resolves to {ip}, which is")
    }
}

/// The longest webhook URL accepted, in bytes.
pub const MAX_URL_BYTES: usize = 2048;

/// Parses and checks the form of a webhook URL: absolute http or https, with a host, without
/// user info or fragment, at most [`MAX_URL_BYTES`].
pub fn parse_url(url: &str) -> Result<Url, UrlRefused> {
    let malformed = |why: &str| Err(UrlRefused::Malformed(why.to_owned()));
    if url.is_empty() {
        return malformed("is required");
    }
    if url.len() > MAX_URL_BYTES {
        return Err(UrlRefused::Malformed(format!(
            "must be at most {MAX_URL_BYTES} bytes"
        )));
    }
    let parsed = match Url::parse(url) {
        Ok(parsed) => parsed,
        Err(e) => return Err(UrlRefused::Malformed(format!("is not a valid URL: {e}"))),
    };
    // The URL is kept and sent as parsed; percent-encoding can make it longer than written.
    if parsed.as_str().len() > MAX_URL_BYTES {
        return Err(UrlRefused::Malformed(format!(
            "must be at most {MAX_URL_BYTES} bytes (percent-encoded)"
        )));
    }
    if !matches!(parsed.scheme(), "http" | "https") {
        return malformed("must be an http or https URL");
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return malformed("must name a host");
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return malformed("must not carry user info (put credentials in the secret instead)");
    }
    if parsed.fragment().is_some() {
        return malformed("must not have a fragment");
    }
    Ok(parsed)
}

/// Checks that `url` may be called: its host is allowed, or it resolves (within `timeout`)
/// only to public addresses.
pub async fn check_url(url: &Url, allow: &AllowList, timeout: Duration) -> Result<(), UrlRefused> {
    let (host, port) = host_and_port(url)?;
    if allow.allows(&host, port) {
        return Ok(());
    }
    let ips: Vec<IpAddr> = match url.host() {
        Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        _ => resolve(&host, port, timeout)
            .await
            .map_err(|reason| UrlRefused::Unresolved {
                host: host.clone(),
                reason,
            })?
            .into_iter()
            .map(|a| a.ip())
            .collect(),
    };
    match ips.into_iter().find(|ip| is_internal(*ip)) {
        Some(ip) if allow.allows_name(&host) => Err(UrlRefused::PortNotAllowed { host, port, ip }),
        Some(ip) => Err(UrlRefused::Internal { host, ip }),
        None => Ok(()),
    }
}

/// The URL's host as written (IPv6 in brackets) and its port (the scheme's default if none).
fn host_and_port(url: &Url) -> Result<(String, u16), UrlRefused> {
    let host = url
        .host_str()
        .ok_or_else(|| UrlRefused::Malformed("must name a host".to_owned()))?;
    let port = url
        .port_or_known_default()
        .ok_or_else(|| UrlRefused::Malformed("must name a port".to_owned()))?;
    Ok((host.to_owned(), port))
}

pub(super) async fn resolve(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, String> {
    // Brackets are URL syntax, not part of the name.
    let name = host.trim_start_matches('[').trim_end_matches(']');
    match tokio::time::timeout(timeout, tokio::net::lookup_host((name, port))).await {
        Err(_) => Err(format!("no answer within {timeout:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                Err("no addresses".to_owned())
            } else {
                Ok(addrs)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for internal in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "169.254.1.1",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::",
            "::1",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:a9fe:a9fe::",
            "2002:7f00:1::1",
            "2002:a00:1:5::1",
            "64:ff9b:1::a9fe:a9fe",
            "64:ff9b:1:ffff::808:808",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "::ffff:0:a9fe:a9fe",
            "::ffff:0:7f00:1",
        ] {
            assert!(is_internal(ip(internal)), "{internal} is internal");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2001:4860:4860::8888",
            "::ffff:0:808:808",
        ] {
            assert!(!is_internal(ip(public)), "{public} is public");
        }
    }

    #[test]
    fn allow_entries_are_kept_as_a_url_writes_the_host_and_odd_ones_refused() {
        for (entry, kept) in [
            ("hooks.internal", "hooks.internal"),
            (" Hooks.Internal:8443 ", "hooks.internal:8443"),
            ("127.1", "127.0.0.1"),
            ("0x7f000001:8181", "127.0.0.1:8181"),
            ("[::1]", "[::1]"),
            ("[0:0::1]:8080", "[::1]:8080"),
            ("[::ffff:127.0.0.1]", "[::ffff:7f00:1]"),
        ] {
            assert_eq!(allow_entry(entry).as_deref(), Ok(kept), "{entry}");
        }
        for entry in [
            "",
            ":80",
            "::1",
            "http://127.0.0.1",
            "hooks.internal/path",
            "hooks.internal:0",
            "hooks.internal:99999",
            "hooks.internal:x",
            "[::1",
            "bad host",
        ] {
            assert!(allow_entry(entry).is_err(), "{entry:?} is refused");
        }
        // An entry written otherwise than the URL still matches it.
        let allow = AllowList::new(["127.1:8181", "[0::1]"]);
        let url = parse_url("http://0x7f.0.0.1:8181/").unwrap();
        let (host, port) = host_and_port(&url).unwrap();
        assert!(allow.allows(&host, port), "{host}:{port}");
        assert!(allow.allows("[::1]", 1));
    }

    #[test]
    fn a_url_is_kept_as_parsed_and_its_length_counted_so() {
        let parsed = parse_url("HTTP://Example.COM:80/a/../b?q=1").unwrap();
        assert_eq!(parsed.as_str(), "http://example.com/b?q=1");
        // Each 'é' is two bytes as written, six percent-encoded.
        let path = "é".repeat(MAX_URL_BYTES / 4);
        let url = format!("https://example.com/{path}");
        assert!(url.len() <= MAX_URL_BYTES);
        assert!(
            matches!(parse_url(&url), Err(UrlRefused::Malformed(why)) if why.contains("percent-encoded"))
        );
    }

    #[test]
    fn urls_must_be_absolute_http_without_user_info() {
        assert!(parse_url("https://example.com/hook?x=1").is_ok());
        assert!(parse_url("http://example.com:8080/").is_ok());
        for bad in [
            "",
            "example.com/hook",
            "ftp://example.com/",
            "https://user:pw@example.com/",
            "https://example.com/#frag",
            "file:///etc/passwd",
            "https://",
            "mailto:a@example.com",
        ] {
            assert!(
                matches!(parse_url(bad), Err(UrlRefused::Malformed(_))),
                "{bad:?} is refused"
            );
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_BYTES));
        assert!(parse_url(&long).is_err());
    }

    #[tokio::test]
    async fn internal_hosts_are_refused_unless_allowed() {
        let none = AllowList::default();
        let timeout = Duration::from_secs(5);
        for url in [
            "http://127.0.0.1:9/",
            "http://10.0.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]:8080/",
            "http://[::ffff:127.0.0.1]/",
            "http://localhost:8080/",
            "http://0x7f.1/",
        ] {
            let parsed = parse_url(url).unwrap();
            assert!(
                matches!(
                    check_url(&parsed, &none, timeout).await,
                    Err(UrlRefused::Internal { .. })
                ),
                "{url} is refused"
            );
        }
        let allow = AllowList::new(["127.0.0.1", "[::1]:8080", "LOCALHOST"]);
        for url in [
            "http://127.0.0.1:9/",
            "http://[::1]:8080/",
            "http://localhost:1/",
        ] {
            let parsed = parse_url(url).unwrap();
            assert_eq!(check_url(&parsed, &allow, timeout).await, Ok(()), "{url}");
        }
        let other_port = parse_url("http://[::1]:8081/").unwrap();
        let refused = check_url(&other_port, &allow, timeout).await;
        assert!(
            matches!(
                &refused,
                Err(UrlRefused::PortNotAllowed { host, port: 8081, .. }) if host == "[::1]"
            ),
            "{refused:?}"
        );
        let message = refused.unwrap_err().to_string();
        assert!(
            message.contains("lists [::1] only with other ports") && message.contains("[::1]:8081"),
            "{message}"
        );
    }
}

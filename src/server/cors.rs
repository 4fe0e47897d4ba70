//! CORS for browsers on other origins: a page served from `https://app.example.com` may call
//! longrun's gRPC-Web and Connect endpoints only when the server says so, in answer to the
//! browser's preflight and on every response. Off unless origins are configured.

use std::time::Duration;

use http::{HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer, ExposeHeaders};

/// How long a browser may reuse a preflight's answer, sparing one OPTIONS round trip a call.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(2 * 60 * 60);

/// The CORS layer for `origins` (each `scheme://host[:port]`, or `*` alone for any origin);
/// `None` when the list is empty. Errors name each entry that is not an origin, since a
/// browser would never send it and the mistake would show only as refused calls.
pub fn layer(origins: &[String]) -> Result<Option<CorsLayer>, String> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allow_origin = if origins.iter().any(|origin| origin == "*") {
        if origins.len() > 1 {
            return Err(
                "cors_allow_origins: \"*\" allows every origin; list no other with it".to_owned(),
            );
        }
        AllowOrigin::any()
    } else {
        let mut values = Vec::with_capacity(origins.len());
        let mut problems = Vec::new();
        for origin in origins {
            match origin_value(origin) {
                Ok(value) => values.push(value),
                Err(why) => problems.push(format!("cors_allow_origins: {origin:?} {why}")),
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        AllowOrigin::list(values)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            // gRPC-Web and Connect calls are all POSTs.
            .allow_methods([Method::POST])
            // Whatever the page's client sends: its protocol's headers (x-grpc-web,
            // connect-timeout-ms, ...), authorization, traceparent, its own metadata. The
            // origin is what is checked.
            .allow_headers(AllowHeaders::mirror_request())
            // Every response header, for the page's script to read: the gRPC-Web status when
            // it comes as headers (a trailers-only response), Connect's `trailer-` headers,
            // `grpc-retry-pushback-ms`. `*` means that because credentials are never allowed.
            .expose_headers(ExposeHeaders::any())
            .max_age(PREFLIGHT_MAX_AGE),
    ))
}

/// `origin` as the `Origin` header a browser sends for it: `scheme://host[:port]`, lowercase.
fn origin_value(origin: &str) -> Result<HeaderValue, &'static str> {
    let (scheme, authority) = origin
        .split_once("://")
        .ok_or("is not an origin: write scheme://host[:port], e.g. https://app.example.com")?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err("has no valid scheme: write scheme://host[:port]");
    }
    if authority.is_empty() {
        return Err("has no host");
    }
    if authority.contains(['/', '?', '#']) {
        return Err("has a path: an origin is only scheme://host[:port], with no trailing slash");
    }
    if authority.contains('@')
        || authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("is not an origin: write scheme://host[:port]");
    }
    if !origin.is_ascii() {
        return Err("is not ASCII: browsers send an international host name in its xn-- form");
    }
    let (scheme, authority) = (scheme.to_ascii_lowercase(), authority.to_ascii_lowercase());
    // What follows the last colon is a port, unless it is inside an IPv6 literal's brackets.
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority.as_str(), None),
    };
    if host.is_empty() {
        return Err("has no host");
    }
    let origin = match port.map(str::parse::<u16>) {
        None => format!("{scheme}://{host}"),
        Some(Ok(port)) if port > 0 => {
            // Browsers leave a scheme's default port out of the Origin they send.
            if (scheme == "https" && port == 443) || (scheme == "http" && port == 80) {
                format!("{scheme}://{host}")
            } else {
                format!("{scheme}://{host}:{port}")
            }
        }
        Some(_) => return Err("has a port that is not a number from 1 to 65535"),
    };
    // Browsers send the scheme and host in lowercase.
    HeaderValue::from_str(&origin).map_err(|_| "is not an origin")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn no_origins_no_layer() {
        assert!(layer(&[]).unwrap().is_none());
    }

    #[test]
    fn origins_and_the_wildcard_are_accepted() {
        for list in [
            &["https://app.example.com"][..],
            &["http://localhost:5173", "https://APP.example.com"],
            &["tauri://localhost"],
            &["*"],
        ] {
            assert!(layer(&origins(list)).unwrap().is_some(), "{list:?}");
        }
        assert_eq!(
            origin_value("HTTPS://App.Example.com:8443").unwrap(),
            "https://app.example.com:8443"
        );
        for (written, sent) in [
            ("https://app.example.com:443", "https://app.example.com"),
            ("http://app.example.com:80", "http://app.example.com"),
            ("http://app.example.com:443", "http://app.example.com:443"),
            ("http://[::1]:5173", "http://[::1]:5173"),
            ("http://[::1]", "http://[::1]"),
        ] {
            assert_eq!(origin_value(written).unwrap(), sent, "{written}");
        }
    }

    #[test]
    fn what_is_not_an_origin_is_refused_naming_it() {
        for (origin, why) in [
            ("https://app.example.com/", "trailing slash"),
            ("https://app.example.com/ui", "has a path"),
            ("app.example.com", "scheme://host"),
            ("https://", "no host"),
            ("://app.example.com", "no valid scheme"),
            ("https://user@app.example.com", "not an origin"),
            ("https://app.example.com?x", "has a path"),
            ("https://app .example.com", "not an origin"),
            ("https://bücher.example", "not ASCII"),
            ("https://app.example.com:abc", "not a number"),
            ("https://app.example.com:0", "not a number"),
            ("https://app.example.com:70000", "not a number"),
            ("https://:8080", "no host"),
        ] {
            let error = layer(&origins(&["https://ok.example", origin])).unwrap_err();
            assert!(error.contains(&format!("{origin:?}")), "{error}");
            assert!(error.contains(why), "{origin}: {error}");
            assert!(!error.contains("ok.example\""), "{error}");
        }
        let mixed = layer(&origins(&["*", "https://app.example.com"])).unwrap_err();
        assert!(mixed.contains("list no other"), "{mixed}");
    }
}

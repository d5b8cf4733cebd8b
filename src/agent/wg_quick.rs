//! Reads the wg-quick configuration the gateway hands out at registration.

use std::net::Ipv4Addr;

use crate::keys::{decode_key, KeyBytes};
use crate::wg_config::PRIVATE_KEY_PLACEHOLDER;

/// What the agent needs from a wg-quick file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgQuick {
    /// `None` when the file holds the placeholder (the key comes from
    /// `--private-key-file`).
    pub private_key: Option<KeyBytes>,
    pub address: Ipv4Addr,
    pub peer_public_key: KeyBytes,
    pub endpoint: String,
    /// The gateway's tunnel address (the first IPv4 of AllowedIPs).
    pub gateway_address: Ipv4Addr,
    pub persistent_keepalive: Option<u16>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

pub fn parse(text: &str) -> Result<WgQuick, ParseError> {
    let mut section = "";
    let (mut private_key, mut address, mut peer, mut endpoint, mut allowed, mut keepalive) =
        (None, None, None, None, None, None);
    let mut saw_private = false;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        let err = |m: String| ParseError {
            line: i + 1,
            message: m,
        };
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = match line {
                "[Interface]" => "interface",
                "[Peer]" => {
                    if peer.is_some() {
                        return Err(err("more than one [Peer]: cloudlink has one gateway".into()));
                    }
                    "peer"
                }
                other => return Err(err(format!("unknown section {other}"))),
            };
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .ok_or_else(|| err(format!("expected `Key = value`, got {line:?}")))?;
        match (section, k) {
            ("interface", "PrivateKey") => {
                saw_private = true;
                if v != PRIVATE_KEY_PLACEHOLDER {
                    private_key = Some(decode_key(v).map_err(|e| err(format!("PrivateKey: {e}")))?);
                }
            }
            ("interface", "Address") => {
                let first = v.split(',').map(str::trim).find_map(|a| {
                    a.split('/')
                        .next()
                        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                });
                address =
                    Some(first.ok_or_else(|| err(format!("Address {v:?} has no IPv4 address")))?);
            }
            (
                "interface",
                "ListenPort" | "MTU" | "DNS" | "Table" | "PostUp" | "PostDown" | "PreUp"
                | "PreDown" | "SaveConfig" | "FwMark",
            ) => {}
            ("peer", "PublicKey") => {
                peer = Some(decode_key(v).map_err(|e| err(format!("PublicKey: {e}")))?);
            }
            ("peer", "Endpoint") => endpoint = Some(v.to_owned()),
            ("peer", "AllowedIPs") => {
                let first = v.split(',').map(str::trim).find_map(|a| {
                    a.split('/')
                        .next()
                        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                });
                allowed = Some(
                    first.ok_or_else(|| err(format!("AllowedIPs {v:?} has no IPv4 address")))?,
                );
            }
            ("peer", "PersistentKeepalive") => {
                keepalive =
                    match v {
                        "off" => None,
                        n => Some(n.parse::<u16>().map_err(|_| {
                            err(format!("PersistentKeepalive {v:?} is not a number"))
                        })?),
                    }
            }
            ("peer", "PresharedKey") => {
                return Err(err("PresharedKey is not supported by cloudlink".into()))
            }
            (_, k) => return Err(err(format!("unknown key {k}"))),
        }
    }
    let missing = |what: &str| ParseError {
        line: 0,
        message: format!("{what} is missing"),
    };
    if !saw_private {
        return Err(missing("[Interface] PrivateKey"));
    }
    Ok(WgQuick {
        private_key,
        address: address.ok_or_else(|| missing("[Interface] Address"))?,
        peer_public_key: peer.ok_or_else(|| missing("[Peer] PublicKey"))?,
        endpoint: endpoint.ok_or_else(|| missing("[Peer] Endpoint"))?,
        gateway_address: allowed.ok_or_else(|| missing("[Peer] AllowedIPs"))?,
        persistent_keepalive: keepalive,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_gateway_hands_out() {
        let text = crate::wg_config::render(
            "dev-1",
            "10.240.0.9".parse().unwrap(),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=",
            "gw.example.net:51820",
            "10.240.0.1".parse().unwrap(),
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.private_key, None);
        assert_eq!(c.address, "10.240.0.9".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c.endpoint, "gw.example.net:51820");
        assert_eq!(c.gateway_address, "10.240.0.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c.persistent_keepalive, Some(25));
        let filled = text.replace(
            PRIVATE_KEY_PLACEHOLDER,
            "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=",
        );
        assert!(parse(&filled).unwrap().private_key.is_some());
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("[Interface]\nPrivateKey = nope\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(parse("[Interface]\nAddress = 10.0.0.2/32\n")
            .unwrap_err()
            .message
            .contains("PrivateKey"));
        assert_eq!(parse("[Wat]\n").unwrap_err().line, 1);
    }
}

//! The wg-quick configuration handed to a device at registration.
//!
//! `AllowedIPs` is the gateway's tunnel address only: cloudlink carries
//! management traffic, never a device's internet traffic. The device's
//! private key never reaches the gateway, so it is left as a placeholder.

use std::net::Ipv4Addr;

/// Stands where the device's private key goes.
pub const PRIVATE_KEY_PLACEHOLDER: &str = "<DEVICE_PRIVATE_KEY>";

/// Keepalive interval written into device configs, in seconds.
pub const PERSISTENT_KEEPALIVE: u16 = 25;

pub fn render(
    uuid: &str,
    device_address: Ipv4Addr,
    gateway_public_key: &str,
    gateway_endpoint: &str,
    gateway_address: Ipv4Addr,
) -> String {
    format!(
        "# cloudlink device {uuid}\n\
         [Interface]\n\
         PrivateKey = {PRIVATE_KEY_PLACEHOLDER}\n\
         Address = {device_address}/32\n\
         \n\
         [Peer]\n\
         PublicKey = {gateway_public_key}\n\
         Endpoint = {gateway_endpoint}\n\
         AllowedIPs = {gateway_address}/32\n\
         PersistentKeepalive = {PERSISTENT_KEEPALIVE}\n"
    )
}

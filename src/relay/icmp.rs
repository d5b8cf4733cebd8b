//! ICMP echo on the gateway's tunnel address, answered without a TCP/IP
//! stack, so `ping <gateway address>` from a device checks its cloudlink.

/// Builds the echo reply to `request` (an IPv4 ICMP echo request) in `out`;
/// returns its length, or `None` if `request` is not an echo request.
pub fn echo_reply(request: &[u8], out: &mut [u8]) -> Option<usize> {
    if request.len() < 20 || request[0] >> 4 != 4 || request[9] != 1 {
        return None;
    }
    let ihl = ((request[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([request[2], request[3]]) as usize;
    if ihl < 20 || total > request.len() || total < ihl + 8 || total > out.len() {
        return None;
    }
    // Fragments are not reassembled: a fragmented ping is not answered.
    if u16::from_be_bytes([request[6], request[7]]) & 0x3fff != 0 {
        return None;
    }
    let icmp = &request[ihl..total];
    if icmp[0] != 8 || icmp[1] != 0 {
        return None;
    }
    let out = &mut out[..total];
    out.copy_from_slice(&request[..total]);
    out[12..16].copy_from_slice(&request[16..20]);
    out[16..20].copy_from_slice(&request[12..16]);
    out[8] = 64;
    out[10] = 0;
    out[11] = 0;
    let c = checksum(&out[..ihl]);
    out[10..12].copy_from_slice(&c.to_be_bytes());
    let body = &mut out[ihl..];
    body[0] = 0;
    body[2] = 0;
    body[3] = 0;
    let c = checksum(body);
    body[2..4].copy_from_slice(&c.to_be_bytes());
    Some(total)
}

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [b] = chunks.remainder() {
        sum += (*b as u32) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_an_echo_request() {
        let mut req = vec![0u8; 28 + 4];
        req[0] = 0x45;
        req[2..4].copy_from_slice(&(32u16).to_be_bytes());
        req[8] = 64;
        req[9] = 1;
        req[12..16].copy_from_slice(&[10, 240, 0, 2]);
        req[16..20].copy_from_slice(&[10, 240, 0, 1]);
        let c = checksum(&req[..20]);
        req[10..12].copy_from_slice(&c.to_be_bytes());
        req[20] = 8;
        req[24..28].copy_from_slice(&[0, 1, 0, 7]);
        req[28..].copy_from_slice(b"ping");
        let c = checksum(&req[20..]);
        req[22..24].copy_from_slice(&c.to_be_bytes());
        let mut out = [0u8; 1500];
        let n = echo_reply(&req, &mut out).unwrap();
        let rep = &out[..n];
        assert_eq!(&rep[12..16], &[10, 240, 0, 1]);
        assert_eq!(&rep[16..20], &[10, 240, 0, 2]);
        assert_eq!(rep[20], 0);
        assert_eq!(&rep[24..], &req[24..]);
        assert_eq!(checksum(&rep[..20]), 0, "valid IP checksum");
        assert_eq!(checksum(&rep[20..]), 0, "valid ICMP checksum");
        // An echo reply is not answered.
        let rep = rep.to_vec();
        assert!(echo_reply(&rep, &mut out).is_none());
    }
}

//! UDP socket options shared by every part that owns a UDP socket: the
//! gateway's packet workers, the agent and the load generator. Below all of
//! them, so none imports another for it.

use std::os::fd::RawFd;

pub fn set_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt reads an int of the given size from &v.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn get_int(fd: RawFd, level: libc::c_int, opt: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into &v.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(v)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Asks for `bytes` of kernel receive and send buffer on a UDP socket:
/// bursts (a relay stream's window, a reconnect storm) must not overflow the
/// default ~200 KiB. `SO_*BUFFORCE` (root or CAP_NET_ADMIN) goes past
/// `net.core.rmem_max`/`wmem_max`; without it the kernel caps the request
/// at those sysctls, and a warning says so.
pub fn size_socket_buffers(fd: RawFd, bytes: usize) {
    let v = bytes as libc::c_int;
    let rcv = set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, v).is_ok()
        || set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, v).is_ok();
    let snd = set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, v).is_ok()
        || set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, v).is_ok();
    // The kernel reports twice the usable size.
    let got = get_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap_or(0) as usize / 2;
    if !rcv || !snd || got < bytes {
        tracing::warn!(
            wanted = bytes,
            got,
            "UDP socket buffers are smaller than wanted; raise the net.core.rmem_max and net.core.wmem_max sysctls (or run with CAP_NET_ADMIN)"
        );
    }
}

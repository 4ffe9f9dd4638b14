//! Sending a SIPC table over a Unix `SOCK_SEQPACKET` socket: the descriptor as bytes, its
//! segments as fds (`SCM_RIGHTS`). Large descriptors and many fds are split over several
//! packets; the receiver enforces limits and refuses truncated messages, so no fd is lost or
//! leaked on any error.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};

use crate::error::{Result, ShmError, errno};
use crate::sipc::SipcTable;

const MAGIC: u32 = u32::from_le_bytes(*b"QSTX");
/// Most fds attached to one packet (the kernel's SCM_MAX_FD is 253).
const FDS_PER_PACKET: usize = 250;
/// Most descriptor bytes per packet, well under the default socket buffer.
const BYTES_PER_PACKET: usize = 32 << 10;
const HEADER: usize = 16;

/// Limits the receiver enforces.
#[derive(Debug, Clone, Copy)]
pub struct RecvLimits {
    /// Largest descriptor accepted.
    pub max_descriptor_bytes: usize,
    /// Most fds accepted.
    pub max_fds: usize,
}

impl Default for RecvLimits {
    fn default() -> Self {
        RecvLimits { max_descriptor_bytes: 64 << 20, max_fds: 4096 }
    }
}

/// A connected pair of `SOCK_SEQPACKET` Unix sockets (close-on-exec).
pub fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(|e| ShmError::Transport { call: "socketpair", source: errno(e) })
}

/// Sends a written table: its descriptor and one fd per segment.
pub fn send_table(sock: BorrowedFd<'_>, table: &SipcTable) -> Result<()> {
    let fds: Vec<BorrowedFd<'_>> = table.segments.iter().map(|s| s.as_fd()).collect();
    send(sock, &table.descriptor, &fds)
}

/// Sends `bytes` and `fds` as one logical message.
pub fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut header = [0u8; HEADER];
    header[..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&(raw.len() as u32).to_le_bytes());
    header[8..].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    let mut fd_chunks = raw.chunks(FDS_PER_PACKET);
    let mut byte_chunks = bytes.chunks(BYTES_PER_PACKET);
    // The header packet carries the first fds; then packets carry bytes and further fds until
    // both run out.
    packet(sock, &header, fd_chunks.next().unwrap_or(&[]))?;
    loop {
        let b = byte_chunks.next();
        let f = fd_chunks.next();
        if b.is_none() && f.is_none() {
            return Ok(());
        }
        packet(sock, b.unwrap_or(&[]), f.unwrap_or(&[]))?;
    }
}

fn packet(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> Result<()> {
    let iov = [IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    loop {
        match socket::sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ShmError::Transport { call: "sendmsg", source: errno(e) }),
        }
    }
}

/// Receives one logical message: descriptor bytes and fds. Fails on a protocol violation,
/// closing every fd received so far.
pub fn recv(sock: BorrowedFd<'_>, limits: &RecvLimits) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut head = [0u8; HEADER + 1];
    let n = recv_packet(sock, &mut head, &mut fds)?;
    if n == 0 && fds.is_empty() {
        return Err(ShmError::Protocol("peer closed the connection".into()));
    }
    if n != HEADER || u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) != MAGIC {
        return Err(ShmError::Protocol(format!("bad header packet of {n} bytes")));
    }
    let n_fds = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
    let len = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    if n_fds > limits.max_fds {
        return Err(ShmError::Protocol(format!("{n_fds} fds is over the limit of {}", limits.max_fds)));
    }
    if len > limits.max_descriptor_bytes as u64 {
        return Err(ShmError::Protocol(format!(
            "descriptor of {len} bytes is over the limit of {}",
            limits.max_descriptor_bytes
        )));
    }
    let len = len as usize;
    let mut bytes = Vec::with_capacity(len);
    while bytes.len() < len || fds.len() < n_fds {
        // One spare byte detects a packet longer than announced.
        let want = (len - bytes.len()).min(BYTES_PER_PACKET);
        let mut buf = vec![0u8; want + 1];
        let before = fds.len();
        let n = recv_packet(sock, &mut buf, &mut fds)?;
        if n > want {
            return Err(ShmError::Protocol("packet carries more bytes than announced".into()));
        }
        if n == 0 && fds.len() == before {
            return Err(ShmError::Protocol(format!(
                "peer stopped after {} of {len} bytes and {} of {n_fds} fds",
                bytes.len(),
                fds.len()
            )));
        }
        if fds.len() > n_fds {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
    if fds.len() != n_fds {
        return Err(ShmError::Protocol(format!("announced {n_fds} fds, received {}", fds.len())));
    }
    Ok((bytes, fds))
}

fn recv_packet(sock: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize> {
    let mut cmsg = nix::cmsg_space!([RawFd; FDS_PER_PACKET + 3]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match socket::recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ShmError::Transport { call: "recvmsg", source: errno(e) }),
        };
        let bytes = msg.bytes;
        let flags = msg.flags;
        for c in msg.cmsgs().map_err(|e| ShmError::Transport { call: "recvmsg cmsgs", source: errno(e) })? {
            if let ControlMessageOwned::ScmRights(rs) = c {
                for r in rs {
                    // SAFETY: the kernel just installed this fd for us; nobody else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                }
            }
        }
        if flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(ShmError::Protocol("control message truncated (too many fds in one packet)".into()));
        }
        if flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(ShmError::Protocol("packet longer than announced".into()));
        }
        return Ok(bytes);
    }
}

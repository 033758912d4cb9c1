//! The TCP rendezvous that multi-process backends start from (NCCL's unique id, say): rank 0
//! listens on `host:port`, every other rank connects and says who it is, and once all `world − 1`
//! ranks are in, rank 0 sends each the same opaque payload (128 bytes for NCCL). Works across
//! nodes: only rank 0's address must be reachable.
//!
//! Wire format (big-endian): a joining rank sends `MAGIC (u32), rank (u32), world (u32)`; rank 0
//! answers `len (u32), payload`. Rank 0 refuses a rank out of range, a repeated rank, a world size
//! that differs from its own, or a stranger (wrong magic), naming the peer. Every wait has the
//! deadline `timeout` (counted from the call); non-root ranks retry connecting until then, so the
//! processes may start in any order.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// First word of a joining rank's greeting ("REEL").
pub const MAGIC: u32 = 0x5245_454c;

/// Why a rendezvous failed; every variant names the address.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The rendezvous address does not resolve or is malformed.
    #[error("rendezvous address {addr:?}: {detail}")]
    Address { addr: String, detail: String },
    /// Rank 0 could not listen on the address.
    #[error("rank 0 cannot listen on {addr}: {detail}")]
    Bind { addr: String, detail: String },
    /// The deadline passed: `missing` names the ranks rank 0 still waited for, or is empty on a
    /// joining rank (which waited for rank 0).
    #[error("rendezvous at {addr} timed out after {waited:?} on rank {rank}{}", missing_note(.missing))]
    Timeout {
        addr: String,
        rank: usize,
        waited: Duration,
        missing: Vec<usize>,
    },
    /// A connection broke or carried something unexpected.
    #[error("rendezvous at {addr} on rank {rank}: {detail}")]
    Protocol {
        addr: String,
        rank: usize,
        detail: String,
    },
    /// `rank`/`world` are inconsistent on this process.
    #[error("rendezvous: rank {rank} is outside a world of {world}")]
    BadRank { rank: usize, world: usize },
}

fn missing_note(m: &[usize]) -> String {
    if m.is_empty() {
        " waiting for rank 0".into()
    } else {
        format!(" waiting for ranks {m:?}")
    }
}

fn resolve(addr: &str) -> Result<SocketAddr, BootstrapError> {
    let err = |detail: String| BootstrapError::Address {
        addr: addr.into(),
        detail,
    };
    addr.to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("resolves to no address".into()))
}

/// Runs the rendezvous: on rank 0 `payload` is sent to every other rank and returned; on other
/// ranks it is ignored and rank 0's payload is returned. `world == 1` returns at once.
pub fn exchange(
    rank: usize,
    world: usize,
    addr: &str,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, BootstrapError> {
    if rank >= world {
        return Err(BootstrapError::BadRank { rank, world });
    }
    if world == 1 {
        return Ok(payload.to_vec());
    }
    let sock = resolve(addr)?;
    let start = Instant::now();
    if rank == 0 {
        let l = TcpListener::bind(sock).map_err(|e| BootstrapError::Bind {
            addr: addr.into(),
            detail: e.to_string(),
        })?;
        serve(l, world, addr, payload, start, timeout)?;
        Ok(payload.to_vec())
    } else {
        join(rank, world, addr, sock, start, timeout)
    }
}

/// Rank 0's side on an already bound listener (tests bind port 0 and pass the listener).
pub fn serve(
    l: TcpListener,
    world: usize,
    addr: &str,
    payload: &[u8],
    start: Instant,
    timeout: Duration,
) -> Result<(), BootstrapError> {
    let proto = |detail: String| BootstrapError::Protocol {
        addr: addr.into(),
        rank: 0,
        detail,
    };
    l.set_nonblocking(true).map_err(|e| proto(e.to_string()))?;
    let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    let mut joined = 1;
    while joined < world {
        match l.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false).map_err(|e| proto(e.to_string()))?;
                let left = timeout
                    .saturating_sub(start.elapsed())
                    .max(Duration::from_millis(1));
                s.set_read_timeout(Some(left)).ok();
                let mut hello = [0u8; 12];
                if let Err(e) = s.read_exact(&mut hello) {
                    return Err(proto(format!("greeting from {from}: {e}")));
                }
                let word =
                    |i: usize| u32::from_be_bytes(hello[i * 4..i * 4 + 4].try_into().unwrap());
                let (magic, r, w) = (word(0), word(1) as usize, word(2) as usize);
                if magic != MAGIC {
                    return Err(proto(format!("{from} is not a reel rank (bad greeting)")));
                }
                if w != world {
                    return Err(proto(format!(
                        "rank {r} at {from} says the world has {w} ranks, rank 0 says {world}"
                    )));
                }
                if r == 0 || r >= world {
                    return Err(proto(format!("{from} claims rank {r} of {world}")));
                }
                if peers[r].is_some() {
                    return Err(proto(format!("rank {r} joined twice (again from {from})")));
                }
                peers[r] = Some(s);
                joined += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() >= timeout {
                    return Err(BootstrapError::Timeout {
                        addr: addr.into(),
                        rank: 0,
                        waited: start.elapsed(),
                        missing: (1..world).filter(|&r| peers[r].is_none()).collect(),
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(proto(format!("accept: {e}"))),
        }
    }
    let mut msg = (payload.len() as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(payload);
    for (r, s) in peers.iter_mut().enumerate().skip(1) {
        let s = s.as_mut().expect("every rank joined");
        s.write_all(&msg)
            .map_err(|e| proto(format!("sending to rank {r}: {e}")))?;
    }
    Ok(())
}

fn join(
    rank: usize,
    world: usize,
    addr: &str,
    sock: SocketAddr,
    start: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, BootstrapError> {
    let timed_out = || BootstrapError::Timeout {
        addr: addr.into(),
        rank,
        waited: start.elapsed(),
        missing: vec![],
    };
    let proto = |detail: String| BootstrapError::Protocol {
        addr: addr.into(),
        rank,
        detail,
    };
    let mut s = loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(timed_out());
        }
        match TcpStream::connect_timeout(&sock, left.min(Duration::from_secs(1))) {
            Ok(s) => break s,
            // Rank 0 may not listen yet: retry until the deadline.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let mut hello = MAGIC.to_be_bytes().to_vec();
    hello.extend_from_slice(&(rank as u32).to_be_bytes());
    hello.extend_from_slice(&(world as u32).to_be_bytes());
    s.write_all(&hello)
        .map_err(|e| proto(format!("greeting: {e}")))?;
    let left = timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left)).ok();
    let read = |s: &mut TcpStream, buf: &mut [u8]| -> Result<(), BootstrapError> {
        s.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => timed_out(),
            _ => proto(format!("reading rank 0's answer: {e} (did rank 0 fail?)")),
        })
    };
    let mut len = [0u8; 4];
    read(&mut s, &mut len)?;
    let mut out = vec![0u8; u32::from_be_bytes(len) as usize];
    read(&mut s, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap().to_string();
        (l, a)
    }

    #[test]
    fn every_rank_gets_rank_zeros_payload() {
        for world in [1usize, 2, 5] {
            let port = {
                let (l, a) = listener();
                drop(l);
                a
            };
            let payload: Vec<u8> = (0..128u8).collect();
            let hs: Vec<_> = (0..world)
                .map(|r| {
                    let (a, p) = (port.clone(), payload.clone());
                    let mine = if r == 0 { p } else { vec![9; 3] };
                    std::thread::spawn(move || {
                        exchange(r, world, &a, &mine, Duration::from_secs(10))
                    })
                })
                .collect();
            for h in hs {
                assert_eq!(h.join().unwrap().unwrap(), payload);
            }
        }
    }

    #[test]
    fn a_missing_rank_times_out_named() {
        let (l, a) = listener();
        let a2 = a.clone();
        let h = std::thread::spawn(move || exchange(1, 3, &a2, &[], Duration::from_secs(5)));
        let e = serve(
            l,
            3,
            &a,
            &[1, 2],
            Instant::now(),
            Duration::from_millis(300),
        )
        .unwrap_err();
        match &e {
            BootstrapError::Timeout {
                missing, rank: 0, ..
            } => assert_eq!(missing, &vec![2]),
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("[2]"), "{e}");
        // Rank 1 sees rank 0 hang up without an answer.
        let e1 = h.join().unwrap().unwrap_err();
        assert!(
            matches!(e1, BootstrapError::Protocol { rank: 1, .. }),
            "{e1}"
        );
    }

    #[test]
    fn joining_rank_times_out_without_rank_zero() {
        let (l, a) = listener();
        drop(l);
        let e = exchange(1, 2, &a, &[], Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, BootstrapError::Timeout { rank: 1, .. }), "{e}");
        assert!(e.to_string().contains("waiting for rank 0"), "{e}");
    }

    #[test]
    fn inconsistent_world_and_duplicates_are_refused() {
        let (l, a) = listener();
        let a2 = a.clone();
        let h = std::thread::spawn(move || exchange(1, 4, &a2, &[], Duration::from_secs(2)));
        let e = serve(l, 2, &a, &[], Instant::now(), Duration::from_secs(2)).unwrap_err();
        assert!(e.to_string().contains("says the world has 4"), "{e}");
        assert!(h.join().unwrap().is_err());

        let (l, a) = listener();
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let a = a.clone();
                std::thread::spawn(move || exchange(1, 3, &a, &[], Duration::from_secs(2)))
            })
            .collect();
        let e = serve(l, 3, &a, &[], Instant::now(), Duration::from_secs(2)).unwrap_err();
        assert!(e.to_string().contains("joined twice"), "{e}");
        for h in hs {
            let _ = h.join();
        }
        assert!(matches!(
            exchange(3, 2, "127.0.0.1:1", &[], Duration::from_secs(1)),
            Err(BootstrapError::BadRank { rank: 3, world: 2 })
        ));
        assert!(matches!(
            exchange(1, 2, "no-port-here", &[], Duration::from_secs(1)),
            Err(BootstrapError::Address { .. })
        ));
    }
}

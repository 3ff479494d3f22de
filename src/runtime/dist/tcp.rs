//! [`super::Collective`] over TCP through rank 0 (a star): rank 0 listens at
//! `MASTER_ADDR:MASTER_PORT`, every other rank connects and says who it is; a reduction sends each
//! rank's buffer to rank 0, which adds them in rank order and sends the sum back. Frames are a
//! little-endian u64 byte count and the bytes.
//!
//! Rank 0 moves (world − 1) × 2 buffers a collective: right for the CPU, small models and LoRA's
//! few parameters; GPUs want NCCL's ring (issue 20's next slice).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use super::{Collective, DistEnv, Timeouts};
use crate::error::{Error, Result};

/// First bytes of a hello: protocol name and version.
const MAGIC: &[u8; 8] = b"BMDIST01";

/// The TCP star of one run, as seen from one rank.
pub struct TcpGroup {
    rank: usize,
    world: usize,
    /// Rank 0: the stream of rank r at index r (index 0 unused). Others: rank 0's at index 0.
    peers: Vec<Option<TcpStream>>,
}

fn io_err(what: String, e: &std::io::Error) -> Error {
    Error::Invalid(format!("--distributed: {what} ({e})"))
}

impl TcpGroup {
    /// Joins the run of `env`: rank 0 waits for every other rank (up to `t.connect`), the others
    /// connect to it, retrying until it listens. A world of one needs no socket.
    pub fn join(env: &DistEnv, t: Timeouts) -> Result<Self> {
        let addr = format!("{}:{}", env.master_addr, env.master_port);
        let mut peers: Vec<Option<TcpStream>> = (0..env.world_size).map(|_| None).collect();
        if env.world_size == 1 {
            return Ok(Self { rank: 0, world: 1, peers });
        }
        if env.rank == 0 {
            let listener = TcpListener::bind(&addr)
                .map_err(|e| io_err(format!("rank 0 cannot listen on {addr}; set MASTER_PORT to a free port"), &e))?;
            listener.set_nonblocking(true).map_err(|e| io_err("listener".into(), &e))?;
            let t0 = Instant::now();
            let mut joined = 1;
            while joined < env.world_size {
                match listener.accept() {
                    Ok((mut s, from)) => {
                        s.set_nonblocking(false).map_err(|e| io_err("socket".into(), &e))?;
                        configure(&s, t)?;
                        let (rank, world) = read_hello(&mut s).map_err(|e| io_err(format!("a hello from {from}"), &e))?;
                        if world != env.world_size {
                            return Err(Error::Invalid(format!(
                                "--distributed: rank {rank} (from {from}) runs with a world size of {world}, rank 0 with {}",
                                env.world_size
                            )));
                        }
                        match peers.get(rank) {
                            Some(None) if rank > 0 => {}
                            _ => {
                                return Err(Error::Invalid(format!(
                                    "--distributed: rank {rank} (from {from}) joined twice or is out of range"
                                )))
                            }
                        }
                        peers[rank] = Some(s);
                        joined += 1;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if t0.elapsed() > t.connect {
                            let missing: Vec<String> = (1..env.world_size).filter(|&r| peers[r].is_none()).map(|r| r.to_string()).collect();
                            return Err(Error::Invalid(format!(
                                "--distributed: ranks {} did not join rank 0 at {addr} within {} s",
                                missing.join(", "),
                                t.connect.as_secs()
                            )));
                        }
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => return Err(io_err("accepting a rank".into(), &e)),
                }
            }
            // everyone is here: let them start
            for (r, p) in peers.iter_mut().enumerate().skip(1) {
                if let Some(s) = p {
                    write_frame(s, b"go").map_err(|e| lost(r, &e))?;
                }
            }
        } else {
            let t0 = Instant::now();
            let mut s = loop {
                match TcpStream::connect(&addr) {
                    Ok(s) => break s,
                    Err(e) if t0.elapsed() > t.connect => {
                        return Err(io_err(
                            format!("rank {} cannot reach rank 0 at {addr} within {} s", env.rank, t.connect.as_secs()),
                            &e,
                        ))
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
                }
            };
            configure(&s, t)?;
            let mut hello = MAGIC.to_vec();
            hello.extend((env.rank as u64).to_le_bytes());
            hello.extend((env.world_size as u64).to_le_bytes());
            s.write_all(&hello).map_err(|e| lost(0, &e))?;
            let go = read_frame(&mut s).map_err(|e| lost(0, &e))?;
            if go != b"go" {
                return Err(Error::Invalid(
                    "--distributed: rank 0 answered the hello with something else".into(),
                ));
            }
            peers[0] = Some(s);
        }
        Ok(Self {
            rank: env.rank,
            world: env.world_size,
            peers,
        })
    }

    fn peer(&mut self, r: usize) -> Result<&mut TcpStream> {
        self.peers
            .get_mut(r)
            .and_then(Option::as_mut)
            .ok_or_else(|| Error::Invalid(format!("--distributed: no connection to rank {r}")))
    }

    /// The sum in rank order of every rank's `bytes` (as `add` reads them), back on every rank.
    fn reduce(&mut self, bytes: Vec<u8>, add: &dyn Fn(&mut [u8], &[u8])) -> Result<Vec<u8>> {
        if self.world == 1 {
            return Ok(bytes);
        }
        if self.rank == 0 {
            let mut acc = bytes;
            for r in 1..self.world {
                let theirs = read_frame(self.peer(r)?).map_err(|e| lost(r, &e))?;
                if theirs.len() != acc.len() {
                    return Err(Error::Invalid(format!(
                        "--distributed: rank {r} reduced {} bytes, rank 0 {}: the ranks disagree on what they train",
                        theirs.len(),
                        acc.len()
                    )));
                }
                add(&mut acc, &theirs);
            }
            for r in 1..self.world {
                write_frame(self.peer(r)?, &acc).map_err(|e| lost(r, &e))?;
            }
            Ok(acc)
        } else {
            let s = self.peer(0)?;
            write_frame(s, &bytes).map_err(|e| lost(0, &e))?;
            read_frame(s).map_err(|e| lost(0, &e))
        }
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        let bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let sum = self.reduce(bytes, &|acc, x| {
            for (a, b) in acc.chunks_exact_mut(4).zip(x.chunks_exact(4)) {
                let v = f32::from_le_bytes([a[0], a[1], a[2], a[3]]) + f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                a.copy_from_slice(&v.to_le_bytes());
            }
        })?;
        for (v, c) in buf.iter_mut().zip(sum.chunks_exact(4)) {
            *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
    fn all_reduce_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        let bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let sum = self.reduce(bytes, &|acc, x| {
            for (a, b) in acc.chunks_exact_mut(8).zip(x.chunks_exact(8)) {
                let (mut aa, mut bb) = ([0u8; 8], [0u8; 8]);
                aa.copy_from_slice(a);
                bb.copy_from_slice(b);
                a.copy_from_slice(&(f64::from_le_bytes(aa) + f64::from_le_bytes(bb)).to_le_bytes());
            }
        })?;
        for (v, c) in buf.iter_mut().zip(sum.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            *v = f64::from_le_bytes(b);
        }
        Ok(())
    }
    fn broadcast(&mut self, bytes: &[u8]) -> Result<Vec<u8>> {
        if self.world == 1 {
            return Ok(bytes.to_vec());
        }
        if self.rank == 0 {
            for r in 1..self.world {
                write_frame(self.peer(r)?, bytes).map_err(|e| lost(r, &e))?;
            }
            Ok(bytes.to_vec())
        } else {
            read_frame(self.peer(0)?).map_err(|e| lost(0, &e))
        }
    }
}

/// The error of a failed exchange with rank `r`: it died, hung or closed its end.
fn lost(r: usize, e: &std::io::Error) -> Error {
    let why = match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "did not answer within the timeout (hung or much slower)",
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            "closed its connection (it exited or was killed)"
        }
        _ => "failed",
    };
    Error::Invalid(format!("--distributed: rank {r} {why}: {e}; stopping this rank"))
}

fn configure(s: &TcpStream, t: Timeouts) -> Result<()> {
    let set = |r: std::io::Result<()>| r.map_err(|e| io_err("socket options".into(), &e));
    set(s.set_nodelay(true))?;
    set(s.set_read_timeout(Some(t.op)))?;
    set(s.set_write_timeout(Some(t.op)))
}

fn read_hello(s: &mut TcpStream) -> std::io::Result<(usize, usize)> {
    let mut h = [0u8; 24];
    s.read_exact(&mut h)?;
    if &h[..8] != MAGIC {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "not a blackmamba rank (bad hello)"));
    }
    let num = |b: &[u8]| -> std::io::Result<usize> {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        usize::try_from(u64::from_le_bytes(a)).map_err(|_| std::io::Error::new(ErrorKind::InvalidData, "rank out of range"))
    };
    Ok((num(&h[8..16])?, num(&h[16..24])?))
}

fn write_frame(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)?;
    s.flush()
}

/// Frames above this are refused (a peer that is not ours, or a corrupt stream).
const MAX_FRAME: u64 = 1 << 36;

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut n = [0u8; 8];
    s.read_exact(&mut n)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_FRAME {
        return Err(std::io::Error::new(ErrorKind::InvalidData, format!("a frame of {n} bytes")));
    }
    let len = usize::try_from(n).map_err(|_| std::io::Error::new(ErrorKind::InvalidData, "frame too large"))?;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

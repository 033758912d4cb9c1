//! Starting a world of processes on one machine, one per GPU (`reel launch --nproc N -- …`, the
//! multi-process tests): each child gets `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`
//! (the processes on its machine) and `REEL_RENDEZVOUS`
//! (`host:port` of rank 0's [`crate::bootstrap`]) in its environment, the rest inherited. Across
//! nodes, run one launcher per node with `base_rank`/`world` set and the same rendezvous.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Environment variable names a launched rank reads.
pub const ENV_RANK: &str = "RANK";
pub const ENV_LOCAL_RANK: &str = "LOCAL_RANK";
pub const ENV_WORLD: &str = "WORLD_SIZE";
/// Processes the launcher started on this machine (local ranks `0..LOCAL_WORLD_SIZE`).
pub const ENV_LOCAL_WORLD: &str = "LOCAL_WORLD_SIZE";
pub const ENV_RENDEZVOUS: &str = "REEL_RENDEZVOUS";

/// What to start.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The program every rank runs.
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Processes on this machine (local ranks `0..nproc`).
    pub nproc: usize,
    /// Global rank of local rank 0 (default 0).
    pub base_rank: usize,
    /// World size over all machines (default `nproc`).
    pub world: usize,
    /// `host:port` of global rank 0's rendezvous (default `127.0.0.1:29533`).
    pub rendezvous: String,
    /// After the first rank fails, how long the others may take to fail by themselves (their
    /// communicator's timeout) before they are killed (default 60 s).
    pub grace: Duration,
    /// Extra environment variables for every rank (default none).
    pub env: Vec<(String, String)>,
}

impl Launch {
    /// `nproc` local ranks forming the whole world, rendezvous on localhost.
    pub fn local(program: impl Into<PathBuf>, args: Vec<OsString>, nproc: usize) -> Self {
        Launch {
            program: program.into(),
            args,
            nproc,
            base_rank: 0,
            world: nproc,
            rendezvous: "127.0.0.1:29533".into(),
            grace: Duration::from_secs(60),
            env: Vec::new(),
        }
    }
}

/// How a launch failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("launch: {0}")]
    Invalid(String),
    #[error("launch: cannot start rank {rank} ({program}): {detail}")]
    Spawn {
        rank: usize,
        program: String,
        detail: String,
    },
    /// One or more ranks exited unsuccessfully: (global rank, status) in order of exit.
    #[error("launch: {}", failed_note(.0))]
    Failed(Vec<(usize, String)>),
}

fn failed_note(f: &[(usize, String)]) -> String {
    f.iter()
        .map(|(r, s)| format!("rank {r} {s}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn describe(s: ExitStatus) -> String {
    match s.code() {
        Some(c) => format!("exited with status {c}"),
        None => format!("was killed ({s})"),
    }
}

/// Starts every local rank and waits for all of them. Succeeds when every rank exits with
/// status 0; otherwise lists the ranks that did not (ranks still running `grace` after the first
/// failure are killed and listed as such).
pub fn run(l: &Launch) -> Result<(), LaunchError> {
    if l.nproc == 0 || l.base_rank + l.nproc > l.world {
        return Err(LaunchError::Invalid(format!(
            "local ranks {}..{} do not fit a world of {}",
            l.base_rank,
            l.base_rank + l.nproc,
            l.world
        )));
    }
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..l.nproc {
        let rank = l.base_rank + local;
        let child = Command::new(&l.program)
            .args(&l.args)
            .env(ENV_RANK, rank.to_string())
            .env(ENV_LOCAL_RANK, local.to_string())
            .env(ENV_WORLD, l.world.to_string())
            .env(ENV_LOCAL_WORLD, l.nproc.to_string())
            .env(ENV_RENDEZVOUS, &l.rendezvous)
            .envs(l.env.iter().map(|(k, v)| (k, v)))
            .spawn();
        match child {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                for (_, c) in children.iter_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(LaunchError::Spawn {
                    rank,
                    program: l.program.display().to_string(),
                    detail: e.to_string(),
                });
            }
        }
    }
    let mut failed = Vec::new();
    let mut first_failure: Option<Instant> = None;
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            match children[i].1.try_wait() {
                Ok(Some(status)) => {
                    let (rank, _) = children.remove(i);
                    if !status.success() {
                        failed.push((rank, describe(status)));
                        first_failure.get_or_insert_with(Instant::now);
                    }
                }
                Ok(None) => i += 1,
                Err(e) => {
                    let (rank, _) = children.remove(i);
                    failed.push((rank, format!("could not be waited for: {e}")));
                }
            }
        }
        if let Some(t) = first_failure {
            if t.elapsed() > l.grace {
                for (rank, c) in children.iter_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                    failed.push((
                        *rank,
                        format!("was killed {:?} after the first failure", l.grace),
                    ));
                }
                children.clear();
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(LaunchError::Failed(failed))
    }
}

/// This process's place in a launched world: `(rank, world, rendezvous)`, or `None` when not
/// launched (no `RANK`). A malformed variable is an error naming it.
pub fn from_env() -> Result<Option<(usize, usize, String)>, String> {
    let Ok(rank) = std::env::var(ENV_RANK) else {
        return Ok(None);
    };
    let num = |name: &str, v: &str| {
        v.parse::<usize>()
            .map_err(|_| format!("{name}={v:?} is not a number"))
    };
    let rank = num(ENV_RANK, &rank)?;
    let world = std::env::var(ENV_WORLD)
        .map_err(|_| format!("{ENV_RANK} is set but {ENV_WORLD} is not"))?;
    let world = num(ENV_WORLD, &world)?;
    let rdv = std::env::var(ENV_RENDEZVOUS).unwrap_or_else(|_| "127.0.0.1:29533".into());
    if rank >= world {
        return Err(format!("{ENV_RANK}={rank} is outside {ENV_WORLD}={world}"));
    }
    Ok(Some((rank, world, rdv)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, nproc: usize) -> Launch {
        let mut l = Launch::local("/bin/sh", vec!["-c".into(), script.into()], nproc);
        l.grace = Duration::from_millis(300);
        l
    }

    #[test]
    fn every_rank_sees_its_environment() {
        let script = "test \"$WORLD_SIZE\" = 3 && test \"$LOCAL_WORLD_SIZE\" = 3 && test \"$RANK\" = \"$LOCAL_RANK\" && test \"$REEL_RENDEZVOUS\" = 127.0.0.1:29533 && test \"$RANK\" -lt 3";
        run(&sh(script, 3)).unwrap();
    }

    #[test]
    fn failures_are_named_and_stragglers_killed() {
        let e = run(&sh("if [ \"$RANK\" = 1 ]; then exit 3; fi; sleep 30", 3)).unwrap_err();
        let LaunchError::Failed(f) = &e else {
            panic!("{e}")
        };
        assert_eq!(f[0], (1, "exited with status 3".to_string()));
        assert_eq!(f.len(), 3, "{e}");
        assert!(e.to_string().contains("was killed"), "{e}");
    }

    #[test]
    fn bad_layout_and_missing_program() {
        let mut l = sh("true", 2);
        l.world = 1;
        assert!(matches!(run(&l), Err(LaunchError::Invalid(_))));
        let l = Launch::local("/no/such/program", vec![], 2);
        assert!(matches!(run(&l), Err(LaunchError::Spawn { rank: 0, .. })));
    }
}

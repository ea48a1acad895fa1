//! The Control API's commit request between the wire and the domain's one
//! model, [`CommitOptions`]: the CLI, the embedding client and the gRPC
//! adapter all convert here, and proto3's zero values ("not given") become
//! the commit's own defaults in one place.

use std::path::PathBuf;

use crate::commit::{CommitError, CommitOptions};
use crate::oci::credentials::RegistryCredentials;
use crate::proto::{RafsMount, SeamlessCommitRequest};
use crate::snapshot::snapshotter::RafsMountInfo;

/// The wire form of `options`; a default field goes as it is (the daemon
/// reads a zero value as the default, so both mean the same).
pub fn commit_to_wire(options: &CommitOptions) -> SeamlessCommitRequest {
    let paths = |paths: &[PathBuf]| paths.iter().map(|p| p.display().to_string()).collect();
    let creds = |c: Option<&RegistryCredentials>| {
        c.map_or_else(Default::default, |c| (c.username().to_owned(), c.password().to_owned()))
    };
    let (target_username, target_password) = creds(options.target_creds.as_ref());
    let (source_username, source_password) = creds(options.source_creds.as_ref());
    SeamlessCommitRequest {
        namespace: options.namespace.clone(),
        container: options.container.clone(),
        target: options.target.clone(),
        format: options.format.as_str().to_owned(),
        work_dir: options.work_dir.display().to_string(),
        fs_version: options.fs_version,
        compressor: options.compressor.clone(),
        target_insecure: options.target_insecure,
        source_insecure: options.source_insecure,
        with_paths: paths(&options.with_paths),
        without_paths: paths(&options.without_paths),
        maximum_times: options.maximum_times,
        target_username,
        target_password,
        source_username,
        source_password,
    }
}

/// A request's credentials for one registry: none when both are empty.
fn credentials_from_wire(
    what: &str,
    username: &str,
    password: &str,
) -> Result<Option<RegistryCredentials>, CommitError> {
    if username.is_empty() && password.is_empty() {
        return Ok(None);
    }
    RegistryCredentials::new(what, username, password)
        .map(Some)
        .map_err(|e| CommitError::InvalidParameter(e.to_string()))
}

pub fn commit_from_wire(r: SeamlessCommitRequest) -> Result<CommitOptions, CommitError> {
    let target_creds = credentials_from_wire(
        "target_username/target_password",
        &r.target_username,
        &r.target_password,
    )?;
    let source_creds = credentials_from_wire(
        "source_username/source_password",
        &r.source_username,
        &r.source_password,
    )?;
    // proto3's zero values stand for "not given": the commit's defaults.
    let defaults = CommitOptions::default();
    Ok(CommitOptions {
        target_creds,
        source_creds,
        format: CommitOptions::parse_format(&r.format)?,
        namespace: r.namespace,
        container: r.container,
        target: r.target,
        work_dir: r.work_dir.into(),
        fs_version: if r.fs_version == 0 {
            defaults.fs_version
        } else {
            r.fs_version
        },
        compressor: if r.compressor.is_empty() {
            defaults.compressor
        } else {
            r.compressor
        },
        target_insecure: r.target_insecure,
        source_insecure: r.source_insecure,
        with_paths: r.with_paths.into_iter().map(PathBuf::from).collect(),
        without_paths: r.without_paths.into_iter().map(PathBuf::from).collect(),
        maximum_times: if r.maximum_times == 0 {
            defaults.maximum_times
        } else {
            r.maximum_times
        },
    })
}

/// A RAFS mount as `ListMounts` answers it.
pub fn rafs_mount_to_wire(mount: RafsMountInfo) -> RafsMount {
    let server = mount.status.server;
    RafsMount {
        mountpoint: mount.status.mountpoint.display().to_string(),
        state: mount.status.state.as_str().to_string(),
        image: mount.image,
        bootstrap_snapshot: mount.bootstrap_key,
        server_pid: server.map(|s| s.pid).unwrap_or(0),
        server_restarts: server
            .map(|s| u32::try_from(s.restarts).unwrap_or(u32::MAX))
            .unwrap_or(0),
        snapshots: mount.users,
        cache_bytes: mount.cache_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_round_trips_and_zero_values_are_the_defaults() {
        let mut options = CommitOptions::new("c1", "registry.example/app:2");
        options.namespace = "ns".into();
        options.with_paths = vec!["/data".into()];
        options.target_creds = Some(RegistryCredentials::new("t", "user", "secret").unwrap());
        let back = commit_from_wire(commit_to_wire(&options)).unwrap();
        assert_eq!(back, options);
        let zero = commit_from_wire(SeamlessCommitRequest {
            container: "c1".into(),
            target: "registry.example/app:2".into(),
            ..Default::default()
        })
        .unwrap();
        let defaults = CommitOptions::default();
        assert_eq!(zero.format, defaults.format);
        assert_eq!(zero.fs_version, defaults.fs_version);
        assert_eq!(zero.compressor, defaults.compressor);
        assert_eq!(zero.maximum_times, defaults.maximum_times);
    }
}

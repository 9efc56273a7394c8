//! Command-line types (clap derive) only: what the user typed, before it means anything.
//! [`settings`] turns them into the commands' resolved requests (LowArgs → HiArgs).

pub mod help;
pub mod settings;

pub use help::command;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::error::EXIT_CODES_HELP;
use crate::units::{parse_duration, parse_timeout};

/// Keeps the VM image cache of a compute host: verified, locked, atomic downloads of Glance
/// images into `<instances_path>/_base`, converted to raw, in Nova's layout.
#[derive(Debug, Parser)]
#[command(name = "imgcache", version, after_help = EXIT_CODES_HELP, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Settings every command shares.
#[derive(Debug, Args)]
#[command(next_help_heading = help::GLOBAL_HEADING)]
pub struct Global {
    /// The directory holding instance directories, `_base` and `locks`.
    #[arg(
        long,
        global = true,
        env = "IMGCACHE_INSTANCES_PATH",
        default_value = "/var/lib/imgcache/instances",
        value_name = "DIR"
    )]
    pub instances_path: PathBuf,

    /// Name of the image cache directory inside the instances path (Nova's
    /// `[image_cache] subdirectory_name`).
    #[arg(long, global = true, default_value = "_base", value_name = "NAME")]
    pub base_dir_name: String,

    /// Print nothing but warnings and errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// More detail on stderr (-v: requests, retries, lock waits, timings; -vv: more). Secrets
    /// are never printed.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Configuration file (TOML; keys are the long flag names, e.g. lock_timeout = "30m").
    /// Default: /etc/imgcache/imgcache.toml if it exists.
    /// IMGCACHE_CONFIG names it too (an empty value means unset).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Download Glance images into the cache, verified and converted to raw.
    ///
    /// Prints `<id> <absolute base path>` per image on stdout (or JSON with --json).
    Fetch(FetchArgs),
    /// Give an instance its disks: root disk from a cached base (fetched first if needed),
    /// kernel/ramdisk, ephemeral and swap disks, disk.info.
    ///
    /// Prints the path of each disk on stdout (or JSON with --json).
    Create(Box<CreateArgs>),
    /// Remove an instance directory, so the bases it used become prunable.
    Delete(DeleteArgs),
    /// Delete what no instance uses: by age, then by size; stale temp and lock files too.
    ///
    /// Safe to run from cron beside fetch and create. Prints one line per removed file and a
    /// total; with --quiet, nothing at all when nothing was removed.
    Prune(PruneArgs),
    /// List cache entries: type, image, format, sizes, last use, users.
    List(ListArgs),
    /// Run the image inspector on a local file, e.g. to vet an image before uploading it.
    ///
    /// Detects the format from the bytes, runs the safety checks imgcache applies to every
    /// download, and asks qemu-img (with -f, under rlimits) for a second opinion.
    Inspect(InspectArgs),
    /// Re-hash cached entries against the digest recorded when they were written.
    Verify(VerifyArgs),
    /// Show the effective settings and where each came from, or print a configuration file
    /// template.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print a man page (roff) on stdout, or write every page into a directory.
    ///
    /// `imgcache man` is imgcache(1), `imgcache man fetch` is imgcache-fetch(1), `imgcache man
    /// config show` is imgcache-config-show(1).
    Man(ManArgs),
}

/// `imgcache man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// The command whose page to print (`fetch`, `config show`); none = imgcache(1).
    #[arg(value_name = "COMMAND")]
    pub command: Vec<String>,

    /// Write every page (imgcache.1, imgcache-fetch.1, ...) into DIR and print their paths.
    #[arg(long, value_name = "DIR", conflicts_with = "command")]
    pub out_dir: Option<PathBuf>,
}

/// `imgcache config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print every setting a configuration file can hold, its effective value, and its source
    /// (flag, env, file, default). Secrets are never shown.
    Show {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a configuration file with every key commented out at its default, each with a
    /// line saying what it does (the file the Debian package installs as
    /// /etc/imgcache/imgcache.toml).
    Template,
}

/// `imgcache prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The instances path may not exist yet (a new host): treat it as an empty cache instead
    /// of failing with exit code 18.
    #[arg(long)]
    pub allow_missing: bool,
    /// Unused original images (and kernels, ramdisks) older than this are removed (Nova's
    /// remove_unused_original_minimum_age_seconds). Age = time since last in use.
    #[arg(long, default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
    pub min_age: Duration,

    /// Same for resized variants, ephemeral and swap templates (Nova's
    /// remove_unused_resized_minimum_age_seconds).
    #[arg(long, default_value = "1h", value_parser = parse_duration, value_name = "DURATION")]
    pub min_age_resized: Duration,

    /// `.part` / `.converted` files untouched this long, whose entry is not locked, are removed.
    #[arg(long, default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
    pub temp_age: Duration,

    /// After the age pass, remove unused entries least recently used first until the cache's
    /// allocated size is at most SIZE (e.g. 200G) or a share of the filesystem's size (e.g.
    /// 80%). Exit 13 if entries in use alone exceed it.
    #[arg(long, value_name = "SIZE|N%")]
    pub max_size: Option<String>,

    /// Treat this image id as in use (repeatable).
    #[arg(long, value_name = "ID")]
    pub keep: Vec<String>,

    /// Read image ids to treat as in use from FILE (`-` = stdin), one per line.
    #[arg(long, value_name = "FILE")]
    pub keep_from: Option<String>,

    /// Print what would be removed and why; change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// One JSON document with every entry: kept/removed, reason, size.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub rbd: RbdArgs,
}

/// `imgcache inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The image file.
    #[arg(value_name = "FILE")]
    pub file: std::path::PathBuf,

    /// The disk_format it will be (or was) uploaded as: raw, qcow2, vmdk, vhd, vhdx, vdi, iso.
    #[arg(long, value_name = "FORMAT")]
    pub declared: Option<String>,

    /// Refuse a larger virtual size.
    #[arg(long, default_value = "2T", value_name = "SIZE")]
    pub max_virtual_size: String,

    /// Accept LUKS (version 1) images.
    #[arg(long)]
    pub allow_luks: bool,

    /// Skip the qemu-img second opinion.
    #[arg(long)]
    pub no_qemu_img: bool,

    /// One JSON document instead of a line.
    #[arg(long)]
    pub json: bool,
}

/// `imgcache list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// One JSON document instead of a table.
    #[arg(long)]
    pub json: bool,

    /// The instances path may not exist yet (a new host): treat it as an empty cache instead
    /// of failing with exit code 18.
    #[arg(long)]
    pub allow_missing: bool,
}

/// `imgcache verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Image ids to verify (default: every entry).
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,

    /// The instances path may not exist yet (a new host): treat it as an empty cache instead
    /// of failing with exit code 18.
    #[arg(long)]
    pub allow_missing: bool,

    /// Delete corrupt entries (under their lock) so the next fetch gets them again.
    #[arg(long)]
    pub remove_corrupt: bool,

    /// How long to wait for an entry's lock when removing it.
    #[arg(long, default_value = "1h", value_parser = parse_duration, value_name = "DURATION")]
    pub lock_timeout: Duration,

    /// One JSON document instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// How to reach Glance. Credentials come from flags, then the OS_* environment (an openrc),
/// then clouds.yaml/secure.yaml (--os-cloud), like python-openstackclient.
#[derive(Debug, Args, Clone)]
pub struct GlanceArgs {
    /// Cloud in clouds.yaml (./, ~/.config/openstack/, /etc/openstack/) to take credentials,
    /// region, interface and TLS settings from.
    #[arg(long, env = "OS_CLOUD", value_name = "NAME")]
    pub os_cloud: Option<String>,

    /// Region whose image endpoint to use from the Keystone catalog.
    #[arg(long, env = "OS_REGION_NAME", value_name = "REGION")]
    pub os_region_name: Option<String>,

    /// Catalog interface: public, internal or admin (default public).
    #[arg(long, env = "OS_INTERFACE", value_name = "INTERFACE")]
    pub os_interface: Option<String>,

    /// Glance endpoint, e.g. http://controller:9292 (with or without /v2); skips the catalog.
    #[arg(long, env = "OS_IMAGE_URL", value_name = "URL")]
    pub glance_url: Option<String>,

    /// Keystone token sent as X-Auth-Token. Never printed.
    #[arg(
        long,
        env = "OS_AUTH_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// PEM file with the CA certificate(s) that sign Glance's TLS certificate.
    #[arg(long, env = "OS_CACERT", value_name = "FILE")]
    pub cacert: Option<PathBuf>,

    /// Do not verify Glance's TLS certificate (unsafe; for lab setups).
    #[arg(long)]
    pub insecure: bool,

    /// Connect timeout (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = parse_timeout, value_name = "DURATION")]
    pub connect_timeout: Duration,

    /// Longest silence while waiting for Glance's answer or the next bytes of an image; a
    /// stalled transfer is then retried (and resumed).
    #[arg(long, default_value = "60s", value_parser = parse_timeout, value_name = "DURATION")]
    pub read_timeout: Duration,

    /// Slowest image transfer accepted, in bytes per second, averaged over each
    /// --read-timeout: a server that drips bytes is treated as stalled (and retried).
    #[arg(long, default_value = "1K", value_name = "SIZE")]
    pub min_rate: String,

    /// Retries after connection errors, timeouts, 5xx and 429 (attempts that made progress
    /// are not counted).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub retries: u32,

    /// First wait between retries; doubles each time, up to 30s. Retry-After wins.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub retry_backoff: Duration,
}

/// How images get into the cache (shared by `fetch` and `create`).
#[derive(Debug, Args, Clone)]
pub struct FetchOpts {
    /// How long to wait for another process working on the same image (0 = do not wait).
    #[arg(long, default_value = "1h", value_parser = parse_duration, value_name = "DURATION")]
    pub lock_timeout: Duration,

    /// Ranged requests in flight for a large image (64 MiB and up) whose server honours
    /// Range, e.g. 4 for a Glance that serves each connection slowly (Swift, S3, a busy
    /// store); 1 (the default) downloads every image as one stream.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16), value_name = "N")]
    pub connections: u32,

    /// Keep non-raw images (qcow2, vmdk, ...) as they are instead of converting to raw.
    #[arg(long)]
    pub no_force_raw: bool,

    /// Read `file://` direct_url locations directly (a Glance file store mounted on this host);
    /// the data is verified the same way. Needs Glance's show_image_direct_url.
    #[arg(long, env = "IMGCACHE_ALLOW_DIRECT_FILE")]
    pub allow_direct_file: bool,

    /// Ask Glance for a cached image's record and refuse to serve the entry if the image's hash
    /// changed (an id purged and reused). Off by default: the cache serves while Glance is down.
    #[arg(long, env = "IMGCACHE_REVALIDATE")]
    pub revalidate: bool,

    /// Like --revalidate, and replace an entry whose image changed, when no instance uses it.
    #[arg(long)]
    pub replace: bool,

    /// Refuse images whose header claims a larger virtual size (e.g. 4T).
    #[arg(long, default_value = "2T", value_name = "SIZE")]
    pub max_virtual_size: String,

    /// Most bytes downloaded for an image whose Glance record has no size (otherwise the
    /// record's size is the cap).
    #[arg(long, default_value = "1T", value_name = "SIZE")]
    pub max_image_size: String,

    /// Free space a conversion to raw must leave on the cache's filesystem (which often holds
    /// the running VMs' disks too): a size (20G) or a percentage (5%). Checked before, and the
    /// conversion is stopped the moment the free space falls to it.
    #[arg(long, default_value = "5%", value_name = "SIZE|PERCENT")]
    pub min_free: String,

    /// Verify each downloaded image's signature (Glance's img_signature* properties, Nova's
    /// verify_glance_signatures) while it downloads; an image without one is refused (exit 17).
    /// Certificates come from Barbican, or from --certificate-dir.
    #[arg(long, env = "IMGCACHE_VERIFY_SIGNATURES")]
    pub verify_signatures: bool,

    /// A trusted certificate: its Barbican UUID, or a PEM file (a value with a / or a .).
    /// Repeatable. With any given, the signing certificate must chain to one of them (Nova's
    /// enable_certificate_validation).
    #[arg(long, value_name = "ID|FILE")]
    pub trusted_cert: Vec<String>,

    /// Read certificates from DIR/<uuid>.pem instead of Barbican.
    #[arg(long, value_name = "DIR")]
    pub certificate_dir: Option<PathBuf>,
}

/// `imgcache fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Glance image ids.
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<String>,

    #[command(flatten)]
    pub glance: GlanceArgs,

    #[command(flatten)]
    pub fetch: FetchOpts,

    /// Images fetched at the same time.
    #[arg(short, long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64), value_name = "N")]
    pub jobs: u16,

    /// One JSON document on stdout instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// Instance disk formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// A full copy of the base (reflink or sparse copy), extended (Nova's Flat).
    Raw,
    /// A qcow2 overlay backed by the base (Nova's use_cow_images, the default).
    Qcow2,
    /// A Ceph RBD clone of the image, imported into the images pool once (Nova's rbd backend).
    Rbd,
}

/// Filesystems an ephemeral disk can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FsArg {
    Ext2,
    Ext3,
    Ext4,
    Xfs,
    Vfat,
}

/// Where the Ceph cluster is (for `--backend rbd`, `delete` of rbd disks, and prune's rbd pass).
#[derive(Debug, Args, Clone)]
pub struct RbdArgs {
    /// Ceph configuration file. Giving it (or IMGCACHE_CEPH_CONF, or `ceph_conf` in the
    /// configuration file) also turns on prune's pass over the images pool.
    #[arg(long, env = "IMGCACHE_CEPH_CONF", value_name = "FILE")]
    pub ceph_conf: Option<std::path::PathBuf>,

    /// Ceph client id (e.g. cinder), passed as --id.
    #[arg(long, env = "IMGCACHE_CEPH_ID", value_name = "ID")]
    pub ceph_id: Option<String>,

    /// Ceph keyring file.
    #[arg(long, env = "IMGCACHE_CEPH_KEYRING", value_name = "FILE")]
    pub ceph_keyring: Option<std::path::PathBuf>,

    /// Pool holding imported images.
    #[arg(
        long,
        env = "IMGCACHE_IMAGES_POOL",
        default_value = "images",
        value_name = "POOL"
    )]
    pub images_pool: String,

    /// Pool holding instance disks (clones).
    #[arg(
        long,
        env = "IMGCACHE_INSTANCES_POOL",
        default_value = "vms",
        value_name = "POOL"
    )]
    pub instances_pool: String,

    /// Longest any single rbd/ceph command may run (imports of big images need long).
    #[arg(long, default_value = "30m", value_parser = parse_timeout, value_name = "DURATION")]
    pub rbd_timeout: Duration,
}

/// `imgcache create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Instance directory name under the instances path (usually the instance UUID).
    #[arg(value_name = "INSTANCE")]
    pub instance: String,

    /// Glance image id of the root disk.
    #[arg(long, value_name = "ID")]
    pub image: String,

    /// Root disk size (flavor root_gb), e.g. 20G; 0 or absent = the image's virtual size.
    /// Never smaller than the image.
    #[arg(long, default_value = "0", value_name = "SIZE")]
    pub size: String,

    /// Disk format of the instance disks.
    #[arg(long, value_enum, default_value_t = BackendArg::Qcow2)]
    pub backend: BackendArg,

    /// Ephemeral disk (disk.local) size in whole GiB, e.g. 10G (flavor ephemeral_gb).
    #[arg(long, value_name = "SIZE")]
    pub ephemeral: Option<String>,

    /// Filesystem of the ephemeral disk.
    #[arg(long, value_enum, default_value_t = FsArg::Ext4)]
    pub ephemeral_fs: FsArg,

    /// Swap disk (disk.swap) size in whole MiB, e.g. 512M (flavor swap).
    #[arg(long, value_name = "SIZE")]
    pub swap: Option<String>,

    /// Allocate the disks' full size now (fallocate), where the filesystem supports it.
    #[arg(long)]
    pub preallocate: bool,

    /// Replace existing disks that do not match the request.
    #[arg(long)]
    pub force: bool,

    /// With --backend rbd: keep the local `_base` entry after importing it into Ceph.
    #[arg(long)]
    pub keep_local_base: bool,

    #[command(flatten)]
    pub rbd: RbdArgs,

    #[command(flatten)]
    pub glance: GlanceArgs,

    #[command(flatten)]
    pub fetch: FetchOpts,

    #[command(flatten)]
    pub config_drive: ConfigDriveArgs,

    /// One JSON document on stdout instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// The config drive of `imgcache create` (`disk.config`, Nova's config drive). Every content
/// flag needs `--config-drive`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Config drive")]
pub struct ConfigDriveArgs {
    /// Make the config drive `<instance>/disk.config` (label config-2), read by cloud-init.
    #[arg(long)]
    pub config_drive: bool,

    /// Filesystem of the config drive (Nova's config_drive_format).
    #[arg(long, value_enum, default_value_t = ConfigDriveFormatArg::Iso9660)]
    pub config_drive_format: ConfigDriveFormatArg,

    /// User data (cloud-config, a script), at most 49149 bytes (Nova's 65535 base64 characters).
    #[arg(long, value_name = "FILE", requires = "config_drive")]
    pub user_data: Option<PathBuf>,

    /// A JSON object merged over the meta_data.json fields imgcache fills in.
    #[arg(long, value_name = "FILE", requires = "config_drive")]
    pub meta_data: Option<PathBuf>,

    /// network_data.json (JSON); `{}` when absent.
    #[arg(long, value_name = "FILE", requires = "config_drive")]
    pub network_data: Option<PathBuf>,

    /// vendor_data.json (JSON); `{}` when absent.
    #[arg(long, value_name = "FILE", requires = "config_drive")]
    pub vendor_data: Option<PathBuf>,

    /// The guest's hostname; default: the instance name, sanitized as Nova does.
    #[arg(long, value_name = "NAME", requires = "config_drive", value_parser = clap::value_parser!(std::ffi::OsString))]
    pub hostname: Option<std::ffi::OsString>,

    /// A public key for public_keys, from an OpenSSH public key file (repeatable).
    #[arg(long, value_name = "NAME=FILE", requires = "config_drive", value_parser = clap::value_parser!(std::ffi::OsString))]
    pub ssh_key: Vec<std::ffi::OsString>,

    /// A key of meta_data.json's `meta` (repeatable).
    #[arg(long, value_name = "KEY=VALUE", requires = "config_drive")]
    pub meta: Vec<String>,

    /// A file to inject at an absolute guest path (Nova's personality files; repeatable).
    #[arg(long, value_name = "GUEST_PATH=LOCAL_FILE", requires = "config_drive", value_parser = clap::value_parser!(std::ffi::OsString))]
    pub file: Vec<std::ffi::OsString>,
}

/// Config drive filesystems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConfigDriveFormatArg {
    Iso9660,
    Vfat,
}

/// `imgcache delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Instance directory name under the instances path.
    #[arg(value_name = "INSTANCE")]
    pub instance: String,

    /// Delete even a directory that does not look like an instance (no disk, disk.info or
    /// imgcache.json in it).
    #[arg(long)]
    pub force: bool,

    /// How long to wait for a `create` working on the same instance.
    #[arg(long, default_value = "1h", value_parser = parse_duration, value_name = "DURATION")]
    pub lock_timeout: Duration,

    #[command(flatten)]
    pub rbd: RbdArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

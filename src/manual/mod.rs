//! The manual: one man page per command (imgcache(1), imgcache-fetch(1), imgcache-config-show(1),
//! ...) made from the clap command with clap_mangen, plus the sections clap knows nothing of
//! (environment, exit status, files, examples, see also), and the configuration file template
//! ([`template`]). Pages are rendered in memory; `imgcache man` prints one or writes them all.

pub mod template;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};

use crate::cli::help;
use crate::config::DEFAULT_PATH;
use crate::error::UsageError;

/// One rendered man page.
#[derive(Debug)]
pub struct Page {
    /// `imgcache`, `imgcache-fetch`, `imgcache-config-show`: the file is `<name>.1`.
    pub name: String,
    /// The roff source.
    pub roff: String,
}

/// Every page: imgcache(1) first, then each command's, depth first.
pub fn pages() -> Vec<Page> {
    let top = help::command();
    let names = page_names(&top);
    let mut out = Vec::new();
    walk(&top, &mut Vec::new(), &names, &mut out);
    out
}

/// The page of `imgcache <words...>` (`[]` = imgcache(1); `["config", "show"]` or
/// `["config-show"]` = imgcache-config-show(1)).
pub fn page(words: &[String]) -> Result<Page, UsageError> {
    let wanted = std::iter::once("imgcache".to_owned())
        .chain(words.iter().cloned())
        .collect::<Vec<_>>()
        .join("-");
    let all = pages();
    let known: Vec<&str> = all.iter().map(|p| p.name.as_str()).collect();
    if !known.contains(&wanted.as_str()) {
        return Err(UsageError(format!(
            "no man page for {:?}; pages: {}",
            words.join(" "),
            known.join(", ")
        )));
    }
    all.into_iter()
        .find(|p| p.name == wanted)
        .ok_or_else(|| UsageError(format!("no man page {wanted}")))
}

/// Writes every page as `DIR/<name>.1` (creating DIR) and returns the paths written.
pub fn write_all(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create man page directory {}", dir.display()))?;
    let mut written = Vec::new();
    for p in pages() {
        let path = dir.join(format!("{}.1", p.name));
        std::fs::write(&path, p.roff.as_bytes())
            .with_context(|| format!("cannot write man page {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// The page names of a command tree (for SEE ALSO), skipping clap's `help`.
fn page_names(top: &clap::Command) -> Vec<String> {
    fn go(cmd: &clap::Command, prefix: &str, out: &mut Vec<String>) {
        for sub in visible(cmd) {
            let name = format!("{prefix}-{}", sub.get_name());
            out.push(name.clone());
            go(sub, &name, out);
        }
    }
    let mut out = vec!["imgcache".to_owned()];
    go(top, "imgcache", &mut out);
    out
}

fn visible(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
}

fn walk(cmd: &clap::Command, path: &mut Vec<String>, names: &[String], out: &mut Vec<Page>) {
    out.push(render(cmd, path, names));
    for sub in visible(cmd) {
        path.push(sub.get_name().to_owned());
        walk(sub, path, names, out);
        path.pop();
    }
}

/// One of clap_mangen's section renderers.
type Section = fn(&Man, &mut dyn std::io::Write) -> std::io::Result<()>;

/// One page: clap_mangen's title, name, synopsis, description and options, then ours.
fn render(cmd: &clap::Command, path: &[String], names: &[String]) -> Page {
    let name = std::iter::once("imgcache")
        .chain(path.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join("-");
    let version = cmd.get_version().unwrap_or(env!("CARGO_PKG_VERSION"));
    let man = Man::new(cmd.clone())
        .title(name.to_uppercase())
        .source(format!("imgcache {version}"))
        .manual("imgcache manual");
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let sections: [Section; 4] = [
        Man::render_title,
        Man::render_name_section,
        Man::render_synopsis_section,
        Man::render_description_section,
    ];
    for section in sections {
        let mut buf = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = section(&man, &mut buf);
        parts.push(buf);
    }
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        let mut buf = Vec::new();
        let _ = man.render_options_section(&mut buf);
        parts.push(buf);
    }
    let command = path.join(" ");
    let mut roff = Roff::new();
    commands_section(&mut roff, cmd, &name);
    environment_section(&mut roff, cmd, path.is_empty());
    exit_status_section(&mut roff, &command, path.is_empty());
    files_section(&mut roff, &command, path.is_empty());
    examples_section(&mut roff, &command);
    see_also_section(&mut roff, &name, names);
    parts.push(roff.render().into_bytes());

    // Each part starts with roff's apostrophe preamble; keep the first one only.
    let preamble = Roff::new().render();
    let mut text = String::new();
    for (i, part) in parts.iter().enumerate() {
        let part = String::from_utf8_lossy(part);
        if i == 0 {
            text.push_str(&part);
        } else {
            text.push_str(part.strip_prefix(&preamble).unwrap_or(&part));
        }
    }
    Page { name, roff: text }
}

/// For a command with subcommands: one item per subcommand, naming its page.
fn commands_section(roff: &mut Roff, cmd: &clap::Command, name: &str) {
    let subs: Vec<&clap::Command> = visible(cmd).collect();
    if subs.is_empty() {
        return;
    }
    roff.control("SH", ["COMMANDS"]);
    for sub in subs {
        roff.control("TP", []);
        roff.text([bold(format!("{name}-{}", sub.get_name())), roman("(1)")]);
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        roff.text([roman(about)]);
    }
}

/// The OS_* variables the Glance/Keystone access reads besides its options' own (as
/// python-openstackclient does; docs/operators.md).
const OS_ENV: &[(&str, &str)] = &[
    (
        "OS_AUTH_URL",
        "Keystone identity URL; imgcache logs in and finds Glance in the catalog.",
    ),
    (
        "OS_AUTH_TYPE",
        "password (default), v3applicationcredential or token.",
    ),
    (
        "OS_USERNAME, OS_USER_ID, OS_PASSWORD",
        "password authentication.",
    ),
    (
        "OS_PROJECT_NAME, OS_PROJECT_ID",
        "the project to scope the token to.",
    ),
    (
        "OS_USER_DOMAIN_NAME, OS_USER_DOMAIN_ID, OS_PROJECT_DOMAIN_NAME, OS_PROJECT_DOMAIN_ID",
        "the domains of the user and the project.",
    ),
    (
        "OS_APPLICATION_CREDENTIAL_ID, OS_APPLICATION_CREDENTIAL_NAME, OS_APPLICATION_CREDENTIAL_SECRET",
        "application credential authentication (the right choice for a host's timer or cron job).",
    ),
    ("OS_TOKEN", "a ready token, with OS_AUTH_TYPE=token."),
];

/// Every variable the command's options read (clap `env`), IMGCACHE_CONFIG, and the OS_*
/// credentials for commands that talk to Glance.
fn environment_section(roff: &mut Roff, cmd: &clap::Command, top: bool) {
    roff.control("SH", ["ENVIRONMENT"]);
    for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        roff.control("TP", []);
        roff.text([bold(env.to_string_lossy().into_owned())]);
        roff.text([
            roman("Sets "),
            bold(format!("--{long}")),
            roman(" when that option is not given."),
        ]);
    }
    roff.control("TP", []);
    roff.text([bold("IMGCACHE_CONFIG")]);
    roff.text([
        roman("The configuration file to read instead of "),
        italic(DEFAULT_PATH),
        roman(" (as "),
        bold("--config"),
        roman("); an empty value means unset."),
    ]);
    if cmd.get_arguments().any(|a| a.get_id() == "glance_url") {
        for (vars, what) in OS_ENV {
            roff.control("TP", []);
            roff.text([bold(*vars)]);
            roff.text([roman(*what)]);
        }
        roff.control("PP", []);
        roff.text([roman(
            "Precedence: options, then the OS_* environment, then clouds.yaml/secure.yaml \
             (--os-cloud). Secrets are never printed.",
        )]);
    }
    if cmd.get_arguments().any(|a| a.get_id() == "ceph_conf") {
        roff.control("TP", []);
        roff.text([bold("IMGCACHE_LIBRBD")]);
        roff.text([roman(
            "off: make every Ceph call with the rbd and ceph CLIs. Otherwise the calls of a              disk's life (clone, resize, remove, the parent's size and last-use mark) go              through librbd in process when librados.so.2 and librbd.so.1 can be loaded.",
        )]);
    }
    if top {
        roff.control("PP", []);
        roff.text([roman(
            "Each command's page lists the variables its own options read.",
        )]);
    }
}

/// The exit codes, one item each: all of them on imgcache(1), the command's own elsewhere.
fn exit_status_section(roff: &mut Roff, command: &str, top: bool) {
    roff.control("SH", ["EXIT STATUS"]);
    let first = command.split(' ').next().unwrap_or_default();
    let codes: Vec<u8> = if top {
        help::exit_codes().iter().map(|(c, _)| *c).collect()
    } else {
        help::codes_of(first).map_or_else(|| vec![0, 1, 2], <[u8]>::to_vec)
    };
    for (code, text) in help::exit_codes() {
        if codes.contains(&code) {
            roff.control("TP", []);
            roff.text([bold(code.to_string())]);
            roff.text([roman(text)]);
        }
    }
    if top || first == "fetch" {
        roff.control("PP", []);
        roff.text([roman(help::exit_codes_note())]);
    }
    if !top {
        roff.control("PP", []);
        roff.text([roman("All exit codes: "), bold("imgcache"), roman("(1).")]);
    }
}

/// The configuration file, and the cache layout for commands that use a cache.
fn files_section(roff: &mut Roff, command: &str, top: bool) {
    roff.control("SH", ["FILES"]);
    roff.control("TP", []);
    roff.text([italic(DEFAULT_PATH)]);
    roff.text([roman(
        "The configuration file, read if it exists: a flat TOML table whose keys are the long \
         option names with _ for - (lock_timeout = \"30m\"). Options and the environment beat \
         it. imgcache config template prints one with every key; imgcache config show prints \
         the effective settings and their sources.",
    )]);
    roff.control("TP", []);
    roff.text([italic("/etc/default/imgcache")]);
    roff.text([roman(
        "Environment of the systemd units the Debian package installs \
         (imgcache-prune.service, imgcache-fetch@.service).",
    )]);
    let uses_cache = top || !help::NO_CACHE.contains(&command);
    if !uses_cache {
        return;
    }
    for (path, what) in [
        (
            "INSTANCES_PATH/_base/",
            "The cache (--base-dir-name): <sha1(image id)> entries, complete and verified; \
             their .info records; .part downloads in progress (resumed by the next fetch); \
             ephemeral_* and swap_* templates.",
        ),
        (
            "INSTANCES_PATH/locks/",
            "One lock file per entry (imgcache-<entry>) and per instance directory \
             (imgcache-instance-<instance>).",
        ),
        (
            "INSTANCES_PATH/INSTANCE/",
            "One directory per instance: disk, disk.local, disk.swap, kernel, ramdisk, \
             disk.info (Nova's) and imgcache.json (the entries it uses, read by prune).",
        ),
    ] {
        roff.control("TP", []);
        roff.text([italic(path)]);
        roff.text([roman(what)]);
    }
    roff.control("PP", []);
    roff.text([roman(
        "INSTANCES_PATH is --instances-path (IMGCACHE_INSTANCES_PATH, \
         default /var/lib/imgcache/instances; Nova's is /var/lib/nova/instances).",
    )]);
}

/// Examples: (what, command line), per command.
fn examples(command: &str) -> &'static [(&'static str, &'static str)] {
    match command {
        "" => &[
            (
                "Cache an image from the Glance of your openrc, in Nova's instances path:",
                ". admin-openrc.sh\nimgcache fetch --instances-path /var/lib/nova/instances IMAGE_ID",
            ),
            (
                "Give an instance a 20 GiB root disk and 512 MiB of swap:",
                "imgcache create INSTANCE --image IMAGE_ID --size 20G --swap 512M",
            ),
            (
                "Remove what no instance uses, keeping the cache under 200 GiB:",
                "imgcache prune --quiet --max-size 200G",
            ),
        ],
        "fetch" => &[
            (
                "Fetch two images at once from a given Glance (token in OS_AUTH_TOKEN):",
                "OS_IMAGE_URL=http://controller:9292 imgcache fetch -j 2 ID1 ID2",
            ),
            (
                "Learn where the base of an image is, for a script:",
                "imgcache fetch --json IMAGE_ID",
            ),
        ],
        "create" => &[
            (
                "A qcow2 overlay root disk of 20 GiB, a 10 GiB ext4 ephemeral disk and swap:",
                "imgcache create INSTANCE --image IMAGE_ID --size 20G \\\n    --ephemeral 10G --swap 512M",
            ),
            (
                "A raw copy instead of an overlay:",
                "imgcache create INSTANCE --image IMAGE_ID --backend raw",
            ),
        ],
        "delete" => &[("Remove an instance directory:", "imgcache delete INSTANCE")],
        "prune" => &[
            ("See what would be removed:", "imgcache prune --dry-run"),
            (
                "From cron or a timer: quiet unless something was removed:",
                "imgcache prune --quiet --max-size 200G",
            ),
            (
                "Keep the images of this host's servers even when their disks live elsewhere:",
                "openstack server list --host $(hostname) -f value -c \"Image ID\" |\n    imgcache prune --keep-from -",
            ),
        ],
        "list" => &[("Every entry as JSON:", "imgcache list --json")],
        "verify" => &[(
            "Re-hash every entry, removing the corrupt ones:",
            "imgcache verify --remove-corrupt",
        )],
        "inspect" => &[(
            "Vet an image before uploading it as qcow2:",
            "imgcache inspect --declared qcow2 disk.qcow2",
        )],
        "config" | "config show" => &[("Where each setting comes from:", "imgcache config show")],
        "config template" => &[(
            "Start a configuration file:",
            "imgcache config template > /etc/imgcache/imgcache.toml",
        )],
        "completions" => &[(
            "Bash completion for every user:",
            "imgcache completions bash > /usr/share/bash-completion/completions/imgcache",
        )],
        "man" => &[
            ("Read the page of fetch:", "imgcache man fetch | man -l -"),
            (
                "Install every page:",
                "imgcache man --out-dir /usr/local/share/man/man1",
            ),
        ],
        _ => &[],
    }
}

fn examples_section(roff: &mut Roff, command: &str) {
    let list = examples(command);
    if list.is_empty() {
        return;
    }
    roff.control("SH", ["EXAMPLES"]);
    for (what, line) in list {
        roff.control("PP", []);
        roff.text([roman(*what)]);
        roff.control("RS", ["4"]);
        roff.control("nf", []);
        for l in line.lines() {
            roff.text([bold(l)]);
        }
        roff.control("fi", []);
        roff.control("RE", []);
    }
}

/// imgcache(1) names every page; a command's page names imgcache(1), its parent and its
/// children.
fn see_also_section(roff: &mut Roff, name: &str, names: &[String]) {
    let related: Vec<&String> = names
        .iter()
        .filter(|n| {
            *n != name
                && (name == "imgcache"
                    || n.as_str() == "imgcache"
                    || n.starts_with(&format!("{name}-"))
                    || name.starts_with(&format!("{n}-")))
        })
        .collect();
    roff.control("SH", ["SEE ALSO"]);
    let mut line = Vec::new();
    for (i, n) in related.iter().enumerate() {
        if i > 0 {
            line.push(roman(", "));
        }
        line.push(bold(n.as_str()));
        line.push(roman("(1)"));
    }
    line.push(roman(", qemu-img(1)."));
    roff.text(line);
}

//! `restore --network-remap SRC:DST`: the restored container's IPv4
//! addresses in SRC move to the same host part of DST. What it translates:
//! the addresses and routes of the network namespace the container joins by
//! path (as CNI, CRI and `ctr run --with-ns` make them), the inet sockets
//! in CRIU's images (`files.img`), so a socket bound to a translated
//! address binds to its new one, and the entries of the container's own
//! `/etc/hosts`. What it cannot: established TCP connections (their peers
//! know the old address), refused; and a network namespace CRIU dumped
//! itself (a container that joined none), refused.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use super::beneath::Beneath;
use super::tree::TreePath;

/// One translation, SRC and DST of the same prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remap {
    pub from: Ipv4Addr,
    pub to: Ipv4Addr,
    pub prefix: u8,
}

impl std::fmt::Display for Remap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}->{}/{}", self.from, self.prefix, self.to, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }
}

/// An IPv4 network `a.b.c.d/n` with no bits set beyond its prefix.
fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (address, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not an IPv4 CIDR (a.b.c.d/n)"))?;
    let address: Ipv4Addr = address
        .parse()
        .map_err(|_| format!("{text:?} is not an IPv4 CIDR: {address:?} is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("{text:?} is not an IPv4 CIDR: prefix {prefix:?} is not 0 to 32"))?;
    let network = Ipv4Addr::from(u32::from(address) & mask(prefix));
    if network != address {
        return Err(format!(
            "{text:?} has bits set beyond its prefix (the network is {network}/{prefix})"
        ));
    }
    Ok((network, prefix))
}

impl Remap {
    /// `SRC_CIDR:DST_CIDR`, `SRC_CIDR->DST_CIDR` or `SRC_CIDR→DST_CIDR`
    /// (U+2192, as the reference's table writes it): two different IPv4
    /// networks of the same prefix length.
    pub fn parse(spec: &str) -> Result<Remap, String> {
        let (from, to) = spec
            .split_once("->")
            .or_else(|| spec.split_once('\u{2192}'))
            .or_else(|| spec.split_once(':'))
            .ok_or_else(|| {
                format!("{spec:?} is not SRC_CIDR:DST_CIDR, SRC_CIDR->DST_CIDR or SRC_CIDR\u{2192}DST_CIDR")
            })?;
        let (from, from_prefix) = parse_cidr(from.trim())?;
        let (to, to_prefix) = parse_cidr(to.trim())?;
        if from_prefix != to_prefix {
            return Err(format!(
                "{spec:?} maps a /{from_prefix} network onto a /{to_prefix}: both need the same prefix length"
            ));
        }
        if from == to {
            return Err(format!("{spec:?} maps {from}/{from_prefix} onto itself"));
        }
        Ok(Remap {
            from,
            to,
            prefix: from_prefix,
        })
    }

    /// `addr` in DST, if it is in SRC.
    pub fn translate(&self, addr: Ipv4Addr) -> Option<Ipv4Addr> {
        let m = mask(self.prefix);
        let a = u32::from(addr);
        (a & m == u32::from(self.from)).then(|| Ipv4Addr::from(u32::from(self.to) | (a & !m)))
    }

    /// The reverse translation (to undo one).
    pub fn reversed(&self) -> Remap {
        Remap {
            from: self.to,
            to: self.from,
            prefix: self.prefix,
        }
    }
}

/// `addr` through the first remap that covers it.
pub fn translate(remaps: &[Remap], addr: Ipv4Addr) -> Option<Ipv4Addr> {
    remaps.iter().find_map(|r| r.translate(addr))
}

/// Rewrites every IPv4 address of `text` (an /etc/hosts) that a remap
/// covers; returns the text and how many were translated.
pub fn rewrite_hosts(text: &str, remaps: &[Remap]) -> (String, usize) {
    let mut changed = 0;
    let lines: Vec<String> = text
        .split('\n')
        .map(|line| {
            let (content, comment) = match line.find('#') {
                Some(i) => line.split_at(i),
                None => (line, ""),
            };
            let mut fields = content.splitn(2, |c: char| c.is_whitespace());
            let first = fields.next().unwrap_or_default();
            match first.parse::<Ipv4Addr>().ok().and_then(|a| translate(remaps, a)) {
                Some(to) => {
                    changed += 1;
                    format!("{to}{}{comment}", &content[first.len()..])
                }
                None => line.to_string(),
            }
        })
        .collect();
    (lines.join("\n"), changed)
}

// Protobuf wire format, enough to rewrite fields in place: every other
// field of CRIU's messages is kept byte for byte.

fn read_varint(data: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *data.get(*at).ok_or("truncated varint")?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint too long".into())
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// One field as it was on the wire.
enum Field<'a> {
    Varint(u32, u64),
    Bytes(u32, &'a [u8]),
    /// Fixed-width fields, kept as they were (tag and value).
    Raw(&'a [u8]),
}

fn fields(data: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let start = at;
        let key = read_varint(data, &mut at)?;
        let (number, wire) = ((key >> 3) as u32, key & 7);
        match wire {
            0 => out.push(Field::Varint(number, read_varint(data, &mut at)?)),
            2 => {
                let len = read_varint(data, &mut at)? as usize;
                let body = data.get(at..at + len).ok_or("truncated field")?;
                at += len;
                out.push(Field::Bytes(number, body));
            }
            1 | 5 => {
                at += if wire == 1 { 8 } else { 4 };
                out.push(Field::Raw(data.get(start..at).ok_or("truncated field")?));
            }
            other => return Err(format!("unsupported wire type {other}")),
        }
    }
    Ok(out)
}

fn encode(fields: &[Field<'_>], replaced: &dyn Fn(u32) -> Option<Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    for field in fields {
        match field {
            Field::Varint(n, v) => {
                write_varint(&mut out, u64::from(*n) << 3);
                write_varint(&mut out, *v);
            }
            Field::Bytes(n, body) => {
                let body = replaced(*n).unwrap_or_else(|| body.to_vec());
                write_varint(&mut out, (u64::from(*n) << 3) | 2);
                write_varint(&mut out, body.len() as u64);
                out.extend_from_slice(&body);
            }
            Field::Raw(raw) => out.extend_from_slice(raw),
        }
    }
    out
}

const FILE_ENTRY_ISK: u32 = 4;
const ISK_STATE: u32 = 6;
const ISK_SRC_ADDR: u32 = 11;
const ISK_DST_ADDR: u32 = 12;
const TCP_ESTABLISHED: u64 = 1;
const AF_INET: u64 = 2;
const ISK_FAMILY: u32 = 3;

/// CRIU keeps an IPv4 address as the u32 its four bytes make in memory.
fn addr_of(word: u64) -> Ipv4Addr {
    Ipv4Addr::from((word as u32).to_le_bytes())
}

fn word_of(addr: Ipv4Addr) -> u64 {
    u64::from(u32::from_le_bytes(addr.octets()))
}

/// Rewrites an inet socket entry; returns it and how many addresses moved.
fn rewrite_socket(isk: &[u8], remaps: &[Remap]) -> Result<(Vec<u8>, usize), String> {
    let parsed = fields(isk)?;
    let varint = |n: u32| {
        parsed.iter().find_map(|f| match f {
            Field::Varint(m, v) if *m == n => Some(*v),
            _ => None,
        })
    };
    if varint(ISK_FAMILY) != Some(AF_INET) {
        return Ok((isk.to_vec(), 0));
    }
    let mut changed = 0;
    let mut rewritten = Vec::with_capacity(parsed.len());
    for field in parsed.iter() {
        match field {
            Field::Varint(n, v) if *n == ISK_SRC_ADDR || *n == ISK_DST_ADDR => match translate(remaps, addr_of(*v)) {
                Some(to) => {
                    if varint(ISK_STATE) == Some(TCP_ESTABLISHED) {
                        return Err(format!(
                            "an established TCP connection of {} cannot be remapped: its peer knows the old \
                                 address",
                            addr_of(*v)
                        ));
                    }
                    changed += 1;
                    rewritten.push(Field::Varint(*n, word_of(to)));
                }
                None => rewritten.push(Field::Varint(*n, *v)),
            },
            Field::Varint(n, v) => rewritten.push(Field::Varint(*n, *v)),
            Field::Bytes(n, b) => rewritten.push(Field::Bytes(*n, b)),
            Field::Raw(r) => rewritten.push(Field::Raw(r)),
        }
    }
    Ok((encode(&rewritten, &|_| None), changed))
}

/// Rewrites the inet sockets of CRIU's `files.img` (magic words, then
/// size-prefixed file entries); returns the image and how many addresses
/// moved.
pub fn rewrite_files_image(image: &[u8], remaps: &[Remap]) -> Result<(Vec<u8>, usize), String> {
    let magic_words = if image.len() >= 8 {
        8
    } else {
        return Err("not a CRIU image".into());
    };
    let mut out = image[..magic_words].to_vec();
    let mut at = magic_words;
    let mut changed = 0;
    while at < image.len() {
        let size = u32::from_le_bytes(
            image
                .get(at..at + 4)
                .ok_or("truncated entry size")?
                .try_into()
                .unwrap_or([0; 4]),
        ) as usize;
        let entry = image.get(at + 4..at + 4 + size).ok_or("truncated entry")?;
        at += 4 + size;
        let parsed = fields(entry)?;
        let mut socket = None;
        for field in &parsed {
            if let Field::Bytes(FILE_ENTRY_ISK, isk) = field {
                socket = Some(rewrite_socket(isk, remaps)?);
            }
        }
        let rewritten = match socket {
            Some((isk, n)) if n > 0 => {
                changed += n;
                encode(&parsed, &|number| (number == FILE_ENTRY_ISK).then(|| isk.clone()))
            }
            _ => entry.to_vec(),
        };
        out.extend_from_slice(&(rewritten.len() as u32).to_le_bytes());
        out.extend_from_slice(&rewritten);
    }
    Ok((out, changed))
}

/// Applies the remaps to CRIU's images in `dir` (its `files.img`), a
/// plain file of that directory: a symlink or anything else in its place
/// is not followed.
pub fn rewrite_images(dir: &Path, remaps: &[Remap]) -> Result<usize, String> {
    let beneath = Beneath::open(dir).map_err(|e| e.to_string())?;
    let name = TreePath::new("files.img").map_err(|e| e.to_string())?;
    let at = beneath.at(&name).map_err(|e| e.to_string())?;
    let Some(image) = at.read_regular().map_err(|e| e.to_string())? else {
        return Ok(0);
    };
    let (rewritten, changed) = rewrite_files_image(&image, remaps)?;
    if changed > 0 {
        at.rewrite_regular(&rewritten).map_err(|e| e.to_string())?;
    }
    Ok(changed)
}

/// An address of the network namespace that a remap moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub device: String,
    pub from: Ipv4Addr,
    pub to: Ipv4Addr,
    pub prefix: u8,
}

fn ip_in(netns: &Path, args: &[&str]) -> Result<String, String> {
    let mut net = std::ffi::OsString::from("--net=");
    net.push(netns);
    let out = Command::new("nsenter")
        .arg(net)
        .arg("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run nsenter ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {} in {}: {}",
            args.join(" "),
            netns.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The IPv4 addresses of `ip -j addr show` output that the remaps move.
pub fn addresses_to_move(ip_json: &str, remaps: &[Remap]) -> Result<Vec<Moved>, String> {
    let links: serde_json::Value = serde_json::from_str(ip_json).map_err(|e| format!("ip -j addr: {e}"))?;
    let mut moved = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        let device = link["ifname"].as_str().unwrap_or_default().to_string();
        for info in link["addr_info"].as_array().into_iter().flatten() {
            if info["family"] != "inet" {
                continue;
            }
            let Some(from) = info["local"].as_str().and_then(|a| a.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            if let Some(to) = translate(remaps, from) {
                moved.push(Moved {
                    device: device.clone(),
                    from,
                    to,
                    prefix: info["prefixlen"].as_u64().unwrap_or(32) as u8,
                });
            }
        }
    }
    Ok(moved)
}

/// Routes (`ip -j route show` output) whose gateway the remaps move, as
/// `ip route replace` arguments.
pub fn routes_to_move(ip_json: &str, remaps: &[Remap]) -> Result<Vec<Vec<String>>, String> {
    let routes: serde_json::Value = serde_json::from_str(ip_json).map_err(|e| format!("ip -j route: {e}"))?;
    let mut out = Vec::new();
    for route in routes.as_array().into_iter().flatten() {
        let Some(gateway) = route["gateway"].as_str().and_then(|g| g.parse::<Ipv4Addr>().ok()) else {
            continue;
        };
        let Some(to) = translate(remaps, gateway) else { continue };
        let mut args = vec![
            route["dst"].as_str().unwrap_or("default").to_string(),
            "via".into(),
            to.to_string(),
        ];
        if let Some(dev) = route["dev"].as_str() {
            args.push("dev".into());
            args.push(dev.to_string());
        }
        out.push(args);
    }
    Ok(out)
}

/// Moves the addresses (and the routes through them) of the network
/// namespace at `netns` by `remaps`; returns what moved.
pub fn renumber_netns(netns: &Path, remaps: &[Remap]) -> Result<Vec<Moved>, String> {
    let routes = routes_to_move(&ip_in(netns, &["-j", "-4", "route", "show"])?, remaps)?;
    let moved = addresses_to_move(&ip_in(netns, &["-j", "addr", "show"])?, remaps)?;
    for m in &moved {
        ip_in(
            netns,
            &["addr", "add", &format!("{}/{}", m.to, m.prefix), "dev", &m.device],
        )?;
        ip_in(
            netns,
            &["addr", "del", &format!("{}/{}", m.from, m.prefix), "dev", &m.device],
        )?;
    }
    for route in &routes {
        let mut args = vec!["route", "replace"];
        args.extend(route.iter().map(String::as_str));
        ip_in(netns, &args)?;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remap(text: &str) -> Remap {
        Remap::parse(text).unwrap()
    }

    #[test]
    fn remaps_parse_and_translate_the_host_part() {
        let r = remap("10.201.0.0/24:10.202.0.0/24");
        assert_eq!(r, remap(" 10.201.0.0/24 -> 10.202.0.0/24 "));
        // The reference's table writes the arrow as U+2192.
        assert_eq!(r, remap("10.201.0.0/24\u{2192}10.202.0.0/24"));
        assert_eq!(r, remap("10.201.0.0/24 → 10.202.0.0/24"));
        assert_eq!(
            r.translate("10.201.0.2".parse().unwrap()),
            Some("10.202.0.2".parse().unwrap())
        );
        assert_eq!(r.translate("10.203.0.2".parse().unwrap()), None);
        assert_eq!(
            r.reversed().translate("10.202.0.5".parse().unwrap()),
            Some("10.201.0.5".parse().unwrap())
        );
        assert_eq!(r.to_string(), "10.201.0.0/24->10.202.0.0/24");
        let cases = [
            ("10.0.0.0/24", "is not SRC_CIDR:DST_CIDR"),
            ("10.0.0.0/24=>10.1.0.0/24", "is not SRC_CIDR:DST_CIDR"),
            ("10.0.0.0/24\u{2190}10.1.0.0/24", "SRC_CIDR\u{2192}DST_CIDR"),
            ("10.0.0.0/24→10.1.0.0/16", "same prefix length"),
            ("10.0.0.0/24:10.1.0.0/16", "same prefix length"),
            ("10.0.0.0:10.1.0.0", "is not an IPv4 CIDR (a.b.c.d/n)"),
            ("10.0.0.0/33:10.1.0.0/33", "is not 0 to 32"),
            ("10.0.0.5/24:10.1.0.0/24", "the network is 10.0.0.0/24"),
            ("10.0.0/24:10.1.0.0/24", "is not an IPv4 address"),
            ("fd00::/64->fd01::/64", "is not an IPv4 CIDR"),
            ("10.0.0.0/24->10.0.0.0/24", "onto itself"),
        ];
        for (spec, reason) in cases {
            let err = Remap::parse(spec).unwrap_err();
            assert!(err.contains(reason), "{spec}: {err}");
        }
    }

    #[test]
    fn hosts_entries_move_comments_and_others_stay() {
        let text = "127.0.0.1 localhost\n10.201.0.2\tweb web.local # me\n# 10.201.0.3 old\n10.9.0.1 other\n";
        let (out, n) = rewrite_hosts(text, &[remap("10.201.0.0/24:10.202.0.0/24")]);
        assert_eq!(n, 1);
        assert_eq!(
            out,
            "127.0.0.1 localhost\n10.202.0.2\tweb web.local # me\n# 10.201.0.3 old\n10.9.0.1 other\n"
        );
    }

    fn isk(state: u64, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, v) in [
            (1u32, 7u64),
            (2, 99),
            (ISK_FAMILY, AF_INET),
            (4, 1),
            (5, 6),
            (ISK_STATE, state),
            (7, 8080),
        ] {
            write_varint(&mut out, u64::from(n) << 3);
            write_varint(&mut out, v);
        }
        for (n, a) in [(ISK_SRC_ADDR, src), (ISK_DST_ADDR, dst)] {
            write_varint(&mut out, u64::from(n) << 3);
            write_varint(&mut out, word_of(a));
        }
        // A nested message (fown, field 13) kept as it is.
        out.extend_from_slice(&[0x6a, 0x02, 0x08, 0x01]);
        out
    }

    fn files_image(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut image = vec![0x19, 0x43, 0x56, 0x54, 0x01, 0x02, 0x03, 0x04];
        for isk in entries {
            let mut entry = vec![0x08, 0x05, 0x10, 0x07]; // type, id
            entry.push(0x22); // field 4, bytes
            write_varint(&mut entry, isk.len() as u64);
            entry.extend_from_slice(isk);
            image.extend_from_slice(&(entry.len() as u32).to_le_bytes());
            image.extend_from_slice(&entry);
        }
        image
    }

    #[test]
    fn bound_sockets_move_and_everything_else_is_kept() {
        let r = [remap("10.201.0.0/24:10.202.0.0/24")];
        let a: Ipv4Addr = "10.201.0.2".parse().unwrap();
        let listening = isk(10, a, Ipv4Addr::UNSPECIFIED);
        let elsewhere = isk(10, "192.168.1.1".parse().unwrap(), Ipv4Addr::UNSPECIFIED);
        let image = files_image(&[listening, elsewhere.clone()]);
        let (out, n) = rewrite_files_image(&image, &r).unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            out,
            files_image(&[isk(10, "10.202.0.2".parse().unwrap(), Ipv4Addr::UNSPECIFIED), elsewhere])
        );
        // Nothing to move: the same bytes.
        assert_eq!(rewrite_files_image(&out, &r).unwrap(), (out.clone(), 0));
        // An established connection cannot move.
        let established = files_image(&[isk(TCP_ESTABLISHED, a, "10.9.0.1".parse().unwrap())]);
        let err = rewrite_files_image(&established, &r).unwrap_err();
        assert!(err.contains("established TCP"), "{err}");
        assert!(rewrite_files_image(&image[..image.len() - 2], &r).is_err());
    }

    #[test]
    fn namespace_addresses_and_gateways_to_move() {
        let addrs = r#"[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
            {"ifindex":5,"ifname":"eth0","addr_info":[{"family":"inet","local":"10.201.0.2","prefixlen":24},
            {"family":"inet6","local":"fe80::1","prefixlen":64}]}]"#;
        let r = [remap("10.201.0.0/24:10.202.0.0/24")];
        assert_eq!(
            addresses_to_move(addrs, &r).unwrap(),
            vec![Moved {
                device: "eth0".into(),
                from: "10.201.0.2".parse().unwrap(),
                to: "10.202.0.2".parse().unwrap(),
                prefix: 24
            }]
        );
        let routes = r#"[{"dst":"default","gateway":"10.201.0.1","dev":"eth0"},{"dst":"10.201.0.0/24","dev":"eth0"}]"#;
        assert_eq!(
            routes_to_move(routes, &r).unwrap(),
            vec![vec!["default", "via", "10.202.0.1", "dev", "eth0"]]
        );
    }
}

//! `checkpointctl list`: checkpoints as a table, a tree of chains, JSON or
//! YAML. JSON and YAML are arrays of [`View`], oldest first (or in the
//! `--sort` order), and their field names are stable. The table's TYPE is
//! `fs` for a filesystem-only checkpoint, `fs+proc` for one with process
//! state.

use std::collections::BTreeMap;

use seamless_snapshotter::checkpoint::filter::Filter;
use seamless_snapshotter::proto::{Checkpoint, ListCheckpointsRequest};

use crate::checkpoints::{columns, created, human_size, labels_text, process_state, to_json, to_yaml, View};
use crate::{daemon, CliError, Context};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this container's checkpoints.
    container: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json", "yaml"])]
    output: String,
    /// Order: by creation time (oldest first), by size (smallest first), by labels.
    #[arg(long, default_value = "time", value_parser = ["time", "size", "labels"])]
    sort: String,
    /// Only checkpoints that match, e.g. "label=prod && age<24h".
    #[arg(short = 'f', long)]
    filter: Option<String>,
    /// Draw parent/child chains as a tree.
    #[arg(long)]
    show_tree: bool,
}

pub async fn run(context: &Context, args: Args) -> Result<(), CliError> {
    let filter = args.filter.clone().unwrap_or_default();
    if !filter.trim().is_empty() {
        // Checked here too, so a typo is reported before connecting.
        Filter::parse(&filter).map_err(|e| CliError::Usage(e.to_string()))?;
    }
    let mut client = daemon::connect(&context.address).await?;
    let mut checkpoints = client
        .list_checkpoints(ListCheckpointsRequest {
            storage: Some(context.storage.clone()),
            namespace: context.namespace.clone(),
            container: args.container.clone().unwrap_or_default(),
            filter,
        })
        .await
        .map_err(|status| CliError::rpc("list checkpoints", status))?
        .into_inner()
        .checkpoints;
    sort(&mut checkpoints, &args.sort);
    let out = match (args.output.as_str(), args.show_tree) {
        ("json", _) => to_json(&checkpoints.iter().map(View::of).collect::<Vec<_>>()) + "\n",
        ("yaml", _) => to_yaml(&checkpoints.iter().map(View::of).collect::<Vec<_>>()),
        (_, true) => render_tree(&checkpoints),
        _ => render_table(&checkpoints),
    };
    print!("{out}");
    Ok(())
}

fn sort(checkpoints: &mut [Checkpoint], by: &str) {
    match by {
        "size" => checkpoints.sort_by(|a, b| (a.size, a.created_unix, &a.id).cmp(&(b.size, b.created_unix, &b.id))),
        "labels" => checkpoints
            .sort_by(|a, b| (labels_text(a), a.created_unix, &a.id).cmp(&(labels_text(b), b.created_unix, &b.id))),
        _ => checkpoints.sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id))),
    }
}

const COLUMNS: usize = 8;
const HEADERS: [&str; COLUMNS] = [
    "ID",
    "CONTAINER",
    "CREATED",
    "SIZE",
    "TYPE",
    "PARENT",
    "STATUS",
    "LABELS",
];

fn row(c: &Checkpoint, id: String) -> [String; COLUMNS] {
    [
        id,
        c.container.clone(),
        created(c),
        human_size(c.size),
        if process_state(c).is_some() { "fs+proc" } else { "fs" }.into(),
        if c.parent.is_empty() {
            "-".into()
        } else {
            c.parent.clone()
        },
        c.status.clone(),
        labels_text(c),
    ]
}

fn render_rows(rows: &[[String; COLUMNS]]) -> String {
    columns(HEADERS, rows)
}

fn render_table(checkpoints: &[Checkpoint]) -> String {
    render_rows(&checkpoints.iter().map(|c| row(c, c.id.clone())).collect::<Vec<_>>())
}

/// Each chain from its root, children below their parent, in list order.
/// A checkpoint whose parent is not listed starts a tree of its own.
fn render_tree(checkpoints: &[Checkpoint]) -> String {
    let listed: BTreeMap<&str, &Checkpoint> = checkpoints.iter().map(|c| (c.id.as_str(), c)).collect();
    let mut children: BTreeMap<&str, Vec<&Checkpoint>> = BTreeMap::new();
    let mut roots = Vec::new();
    for c in checkpoints {
        if listed.contains_key(c.parent.as_str()) {
            children.entry(c.parent.as_str()).or_default().push(c);
        } else {
            roots.push(c);
        }
    }
    let mut rows = Vec::new();
    fn walk<'a>(
        c: &'a Checkpoint,
        prefix: &str,
        branch: &str,
        children: &BTreeMap<&str, Vec<&'a Checkpoint>>,
        rows: &mut Vec<[String; COLUMNS]>,
    ) {
        rows.push(row(c, format!("{prefix}{branch}{}", c.id)));
        let kids = children.get(c.id.as_str()).map(Vec::as_slice).unwrap_or_default();
        let below = match branch {
            "" => prefix.to_string(),
            "├── " => format!("{prefix}│   "),
            _ => format!("{prefix}    "),
        };
        for (i, kid) in kids.iter().enumerate() {
            let branch = if i + 1 == kids.len() {
                "└── "
            } else {
                "├── "
            };
            walk(kid, &below, branch, children, rows);
        }
    }
    for root in roots {
        walk(root, "", "", &children, &mut rows);
    }
    render_rows(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(id: &str, parent: &str, created: i64, size: u64) -> Checkpoint {
        Checkpoint {
            id: id.into(),
            container: "web".into(),
            parent: parent.into(),
            created_unix: created,
            size,
            status: "ready".into(),
            ..Checkpoint::default()
        }
    }

    #[test]
    fn chains_are_drawn_under_their_roots() {
        let list = [
            cp("cp-a", "", 1, 10),
            cp("cp-b", "cp-a", 2, 10),
            cp("cp-c", "cp-b", 3, 10),
            cp("cp-d", "cp-a", 4, 10),
            cp("cp-e", "", 5, 10),
            cp("cp-f", "cp-gone", 6, 10),
        ];
        let tree = render_tree(&list);
        let ids: Vec<&str> = tree
            .lines()
            .skip(1)
            .map(|l| l.split(" web").next().unwrap().trim_end())
            .collect();
        assert_eq!(
            ids,
            vec!["cp-a", "├── cp-b", "│   └── cp-c", "└── cp-d", "cp-e", "cp-f"],
            "{tree}"
        );
    }

    #[test]
    fn tables_align_and_sorts_order() {
        let mut list = vec![cp("cp-b", "cp-a", 2, 5000), cp("cp-a", "", 1, 10)];
        sort(&mut list, "time");
        assert_eq!(list[0].id, "cp-a");
        sort(&mut list, "size");
        assert_eq!(list[0].id, "cp-a");
        let table = render_table(&list);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("ID    CONTAINER  CREATED"), "{table}");
        assert_eq!(lines[0].find("CONTAINER"), lines[1].find("web"), "{table}");
        assert!(lines[2].contains("4.9 KB") && lines[2].contains("cp-a"), "{table}");
    }

    #[test]
    fn the_type_column_marks_process_state() {
        let with_process = Checkpoint {
            process: Some(seamless_snapshotter::proto::ProcessState::default()),
            ..cp("cp-b", "cp-a", 2, 10)
        };
        let table = render_table(&[cp("cp-a", "", 1, 10), with_process]);
        let at = table.find("TYPE").unwrap();
        let types: Vec<&str> = table
            .lines()
            .map(|l| l[at..].split_whitespace().next().unwrap_or_default())
            .collect();
        assert_eq!(types, vec!["TYPE", "fs", "fs+proc"], "{table}");
    }
}

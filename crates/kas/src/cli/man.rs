//! `kas man --dir DIR`: a man page per command, from the same definitions as `--help`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes `kas.1` and `kas-<sub>[-<sub>…].1` for every subcommand; returns the files written.
pub fn write_pages(root: clap::Command, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    write_tree(root, "kas", dir, &mut written)?;
    Ok(written)
}

fn write_tree(
    cmd: clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<()> {
    // The page's title and synopsis name the full command, as `man kas-agent-reconcile` finds it.
    let cmd = cmd.bin_name(name.replace('-', " "));
    let file = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name)
        .render(&mut page)
        .with_context(|| format!("rendering the page of {name}"))?;
    std::fs::write(&file, page).with_context(|| format!("writing {}", file.display()))?;
    written.push(file);
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        let sub_name = format!("{name}-{}", sub.get_name());
        write_tree(sub.clone(), &sub_name, dir, written)?;
    }
    Ok(())
}

//! `dcflow man` and `dcflow completions`: the manual page and shell completions, from the
//! command line's own definition.

use super::Failure;
use crate::cli::Cli;

pub fn completions(shell: clap_complete::Shell) -> Result<(), Failure> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "dcflow", &mut std::io::stdout());
    Ok(())
}

pub fn man() -> Result<(), Failure> {
    let cmd = <Cli as clap::CommandFactory>::command();
    let mut out = std::io::stdout();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut out)
        .and_then(|()| {
            // One section per command, after the overview.
            for sub in cmd.get_subcommands() {
                use std::io::Write;
                writeln!(out, ".SH \"DCFLOW {}\"", sub.get_name().to_uppercase())?;
                let page = clap_mangen::Man::new(sub.clone());
                page.render_description_section(&mut out)?;
                page.render_options_section(&mut out)?;
            }
            Ok(())
        })
        .map_err(|e| Failure::work("dcflow man", e.into()))
}

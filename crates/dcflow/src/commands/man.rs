//! `dcflow man` and `dcflow completions`: the manual page and shell completions, from the
//! command line's own definition.

use super::Failure;
use crate::cli::Cli;

pub fn completions(shell: clap_complete::Shell) -> Result<(), Failure> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "dcflow", &mut std::io::stdout());
    Ok(())
}

/// What the generated sections do not say: exit codes, environment, files.
const EXTRA: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
Success: every selected file copied or already present (replay, retry); a clean stop after
SIGTERM or SIGINT (run, dispatch); a command that printed what was asked.
.TP
\fB1\fR
Work failed: a failure row was written (the last line names the failure file), or the
daemon's status endpoint could not be reached (status).
.TP
\fB2\fR
Usage, configuration or credential error (every problem is listed), or a run that could not
go on (records that cannot be written, a Kafka set-up error).
.TP
\fB130\fR
A second stop signal during the drain of run or dispatch.
.SH ENVIRONMENT
.TP
\fBDCFLOW_CONFIG\fR
The configuration file when \fB\-\-config\fR is not given.
.TP
\fBDCFLOW_LOG\fR
The log filter, e.g. \fBinfo\fR, \fBdebug\fR, \fBinfo,dcflow_transfer=debug\fR; it wins over
\fB\-v\fR and \fB\-q\fR.
.TP
\fBX509_USER_PROXY\fR, \fBX509_CERT_DIR\fR
The X.509 proxy and the trusted CA folder when [local] proxy and capath are not set.
.TP
\fBBEARER_TOKEN\fR, \fBBEARER_TOKEN_FILE\fR, \fBXDG_RUNTIME_DIR\fR
WLCG bearer token discovery when [local] token is not set.
.SH FILES
.TP
\fI/etc/dcflow/dcflow.toml\fR
The configuration when neither \fB\-\-config\fR nor \fBDCFLOW_CONFIG\fR names one.
.TP
\fI/etc/grid-security/certificates\fR
The trusted CA folder (hashed *.0 files) by default.
.TP
\fI/tmp/x509up_u<uid>\fR
The X.509 proxy by default (a systemd unit with PrivateTmp does not see it).
.TP
failedtasksfile, successfultaskfile, statefile
The records (CSV) and the workflow state (SQLite) named in [local].
.SH "SEE ALSO"
The commented example of every key, examples/dcflow.toml; the systemd unit,
contrib/systemd/dcflow.service; the README.
"#;

pub fn man() -> Result<(), Failure> {
    let cmd = <Cli as clap::CommandFactory>::command();
    let mut out = std::io::stdout();
    let page = clap_mangen::Man::new(cmd.clone());
    // The overview without its list of dcflow-<command>(1) pages (there are none): one
    // section per command instead, then what the generated sections do not say.
    page.render_title(&mut out)
        .and_then(|()| page.render_name_section(&mut out))
        .and_then(|()| page.render_synopsis_section(&mut out))
        .and_then(|()| page.render_description_section(&mut out))
        .and_then(|()| page.render_options_section(&mut out))
        .and_then(|()| {
            use std::io::Write;
            for sub in cmd.get_subcommands() {
                writeln!(out, ".SH \"DCFLOW {}\"", sub.get_name().to_uppercase())?;
                let page = clap_mangen::Man::new(sub.clone());
                page.render_description_section(&mut out)?;
                page.render_options_section(&mut out)?;
            }
            out.write_all(EXTRA.as_bytes())?;
            page.render_version_section(&mut out)
        })
        .map_err(|e| Failure::work("dcflow man", e.into()))
}

//! The `edgesync` binary: parse the command line, set up tracing, dispatch.

use anyhow::Context;
use clap::Parser;
use edgesync::cli::{AupAction, Cli, Command, NodeAction};
use edgesync::commands::{self, CommandError};
use edgesync::config::ConfigError;
use edgesync::{crd, dev, edge, head, runtime};

/// jemalloc: it gives freed pages back to the system, where glibc's allocator kept most of what
/// a head's documents and handshakes had used, pinned between the blocks still live (a third
/// of a head's memory per edge). See [`tune_allocator`].
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A head keeps the pages it freed for jemalloc's usual ten seconds (a fan-out frees and takes
/// them again at once) and has one thread of jemalloc's own return them while it is idle. An
/// edge, whose work comes a little at a time, returns them as they come free: an idle edge
/// would otherwise keep a few megabytes it no longer uses, with no allocation to trigger
/// their return.
fn tune_allocator(command: &Command) {
    let tuned = match command {
        // One thread for all arenas (the default is one per arena in use).
        Command::Head(_) => tikv_jemalloc_ctl::max_background_threads::write(1)
            .and_then(|()| tikv_jemalloc_ctl::background_thread::write(true)),
        Command::Edge(_) => runtime::tune_edge_allocator(),
        _ => Ok(()),
    };
    if let Err(e) = tuned {
        tracing::warn!("the allocator keeps its defaults: {e}");
    }
}

fn main() {
    let cli = Cli::parse();
    let quiet = matches!(cli.command, Command::Dev(_));
    if matches!(
        cli.command,
        Command::Head(_) | Command::Edge(_) | Command::Dev(_)
    ) {
        runtime::private_umask();
    }
    let default_level = if quiet { "warn" } else { "info" };
    runtime::init_tracing(cli.log_format, cli.log_level.as_deref(), default_level);
    // A head serves many edges on two worker threads; an edge, or a command, needs one thread
    // (fewer stacks and allocator arenas keep an idle edge small).
    let mut builder = match cli.command {
        Command::Head(_) | Command::Dev(_) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(2);
            builder
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    tune_allocator(&cli.command);
    let tokio = builder.enable_all().build().expect("tokio runtime starts");
    let code = match tokio.block_on(dispatch(cli.command)) {
        Ok(()) => 0,
        // Everything is said already (diff's "something would change").
        Err(ref e) if let Some(CommandError::Exit(code)) = e.downcast_ref() => *code,
        Err(e) => {
            let code = if let Some(c) = e.downcast_ref::<CommandError>() {
                c.exit_code()
            } else if e.downcast_ref::<ConfigError>().is_some() {
                2
            } else {
                1
            };
            eprintln!("error: {}", one_line(&e));
            code
        }
    };
    std::process::exit(code);
}

fn one_line(e: &anyhow::Error) -> String {
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    let mut text = chain[0].clone();
    for cause in &chain[1..] {
        if !text.contains(cause.as_str()) {
            text = format!("{text}: {cause}");
        }
    }
    text.replace('\n', " ")
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Head(args) => {
            let config = args.resolve()?;
            let head = head::Head::start(config)
                .await
                .context("head failed to start")?;
            runtime::notify_ready();
            runtime::terminated().await;
            runtime::notify_stopping();
            head.shutdown().await;
        }
        Command::Edge(args) => {
            let config = args.resolve()?;
            let edge = edge::Edge::start(config)
                .await
                .context("edge failed to start")?;
            runtime::notify_ready();
            runtime::notify_status(
                "serving its pods from local state; syncing whenever a head answers",
            );
            runtime::terminated().await;
            runtime::notify_stopping();
            edge.shutdown().await;
        }
        Command::Token { action } => commands::token(action).await?,
        Command::Node {
            action: NodeAction::Remove { name, socket },
        } => commands::node_remove(&socket, &name).await?,
        Command::Node {
            action: NodeAction::List { socket, output },
        } => commands::node_list(&socket, &output).await?,
        Command::User { action } => commands::user(action).await?,
        Command::Aup {
            action: AupAction::Set { file, socket },
        } => commands::aup_set(&socket, &file).await?,
        Command::Apply(args) => commands::apply(&args).await?,
        Command::Diff(args) => commands::diff(&args).await?,
        Command::Describe(args) => commands::describe(&args).await?,
        Command::Audit {
            since,
            output,
            socket,
        } => commands::audit(&socket, since.as_deref(), output).await?,
        Command::Node {
            action: NodeAction::Describe { name, socket },
        } => commands::node_describe(&socket, &name).await?,
        Command::Get(args) => commands::get(&args).await?,
        Command::Delete(args) => commands::delete(&args).await?,
        Command::Status(args) => commands::status(&args).await?,
        Command::Crd { resource } => match crd::yaml_of(&resource) {
            Some(yaml) => print!("{yaml}"),
            None => {
                let known: Vec<&str> = crd::GENERATED.iter().map(|g| g.plural).collect();
                let known = known.join(", ");
                let reason = format!("no CRD {resource:?}; edgesync generates {known}");
                return Err(CommandError::Usage(reason).into());
            }
        },
        Command::Dev(args) => dev::run(args.once).await?,
        Command::Version(args) => commands::version(&args)?,
        Command::Completion { shell } => {
            use clap::CommandFactory;
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "edgesync", &mut std::io::stdout());
        }
    }
    Ok(())
}

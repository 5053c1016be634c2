//! A schedule's steps, drawn from its seed alone (never from what happened while it ran), so
//! one seed always gives the same steps.

use fastrand::Rng;
use std::collections::BTreeMap;
use std::fmt;

/// Pod names the schedules use; EdgeNodes hold a few of them.
pub const PODS: [&str; 5] = ["web", "db", "cache", "api", "queue"];
/// Namespaces of each edge's EdgeNodes.
pub const NAMESPACES: [&str; 2] = ["default", "team-a"];

/// Where a command runs: the head or edge `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    /// The head.
    Head,
    /// Edge `i` (named by [`node_name`]).
    Edge(usize),
}

/// The node name of edge `i`.
pub fn node_name(edge: usize) -> String {
    format!("edge{:02}", edge + 1)
}

/// What an apply sets for one EdgeNode: its whole pod list, as pod name -> image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The EdgeNode's namespace.
    pub namespace: String,
    /// Index of the edge it is for.
    pub edge: usize,
    /// Pod name -> image of its one container.
    pub pods: BTreeMap<String, String>,
}

impl Spec {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        doc_key(self.namespace.as_str(), self.edge)
    }
}

/// `namespace/name` of the EdgeNode of edge `edge` in `namespace`.
pub fn doc_key(namespace: &str, edge: usize) -> String {
    format!("{namespace}/{}", node_name(edge))
}

/// How a manifest is edited by hand.
#[derive(Debug, Clone)]
pub enum HandEdit {
    /// Removed.
    Delete,
    /// Overwritten with this text.
    Junk(&'static str),
    /// Its first container's image changed to this.
    Image(String),
}

/// Something the kubelet's directory holds that edgesync never wrote.
#[derive(Debug, Clone, Copy)]
pub enum ForeignKind {
    /// A regular file with this content.
    File(&'static str),
    /// A symbolic link to a file outside the directory.
    Link,
    /// A symbolic link to nothing.
    Dangling,
    /// A directory.
    Dir,
}

/// Foreign things a schedule may plant, by name. None is ever a manifest's name.
pub const FOREIGN: [(&str, ForeignKind); 8] = [
    (
        "kube-apiserver.yaml",
        ForeignKind::File("apiVersion: v1\nkind: Pod\n"),
    ),
    ("notes.txt", ForeignKind::File("written by hand")),
    (
        "edgesync_team-b_web.json",
        ForeignKind::File(
            "{\"metadata\": {\"annotations\": {\"edgesync.io/managed\": \"true\", \"edgesync.io/source\": \"team-b/edge01\"}}}\n",
        ),
    ),
    ("edgesync_default_web.json.bak", ForeignKind::File("backup")),
    (".edgesync-x.tmp.bak", ForeignKind::File("not a temp file")),
    ("etcd.json", ForeignKind::Link),
    ("edgesync_team-b_db.json", ForeignKind::Dangling),
    ("edgesync_team-b_dir.json", ForeignKind::Dir),
];

/// Link faults.
#[derive(Debug, Clone, Copy)]
pub enum LinkFault {
    /// Nothing passes either way.
    Cut,
    /// Nothing passes towards the head.
    CutToHead,
    /// Nothing passes towards the edge.
    CutToEdge,
    /// Everything passes again, undegraded.
    Heal,
    /// Loss, delay, reordering and duplication.
    Degrade {
        /// Loss probability per datagram.
        drop: f64,
        /// Delay, milliseconds.
        delay_ms: u64,
        /// Random extra delay up to this (reorders), milliseconds.
        jitter_ms: u64,
        /// Duplication probability per datagram.
        duplicate: f64,
    },
}

/// One step of a schedule.
#[derive(Debug, Clone)]
pub enum Step {
    /// SIGKILL the head.
    KillHead,
    /// Start the head (it is down).
    StartHead,
    /// SIGKILL the head and start it again at once.
    RestartHead,
    /// SIGKILL edge `i`.
    KillEdge(usize),
    /// Start edge `i` (it is down).
    StartEdge(usize),
    /// SIGKILL edge `i` and start it again at once.
    RestartEdge(usize),
    /// `edgesync apply -f` of these EdgeNodes on `on`; with `kill_after_us`, the daemon
    /// serving it is SIGKILLed that many microseconds after the command has its input.
    Apply {
        /// Where it runs.
        on: Side,
        /// What it sets.
        specs: Vec<Spec>,
        /// When to kill the daemon while the apply runs, if at all.
        kill_after_us: Option<u64>,
    },
    /// An apply on the head and one on edge `edge` at the same moment.
    ApplyBoth {
        /// What the head's sets.
        head: Vec<Spec>,
        /// Which edge.
        edge: usize,
        /// What the edge's sets.
        on_edge: Vec<Spec>,
    },
    /// `edgesync delete edgenode` of edge `edge`'s EdgeNode in `namespace` on `on`.
    Delete {
        /// Where it runs.
        on: Side,
        /// The EdgeNode's namespace.
        namespace: &'static str,
        /// Whose EdgeNode.
        edge: usize,
    },
    /// A fault on the link of edge `i`.
    Link(usize, LinkFault),
    /// A hand edit of the manifest of `pod` in `namespace` on edge `edge`; if it is not
    /// there, of another of edgesync's manifests there, if any.
    HandEdit {
        /// Which edge.
        edge: usize,
        /// The EdgeNode's namespace.
        namespace: &'static str,
        /// The pod.
        pod: &'static str,
        /// What is done to it.
        edit: HandEdit,
    },
    /// Plant [`FOREIGN`]`[index]` in edge `edge`'s manifest directory.
    Plant {
        /// Which edge.
        edge: usize,
        /// Index into [`FOREIGN`].
        index: usize,
    },
    /// Let time pass (sync, reconcile and drift repair happen meanwhile).
    Pause(u64),
    /// Heal every link, start every daemon, and check what must hold (see `check`) before
    /// going on: an acknowledged edit lost and later superseded is seen here.
    Settle,
}

/// The steps of one schedule, and the edits made once it has healed.
pub struct Plan {
    /// Its seed.
    pub seed: u64,
    /// How many edges (1 or 2).
    pub edges: usize,
    /// Each edge's drift interval (how soon it repairs a hand edit with no apply), ms.
    pub drift_ms: Vec<u64>,
    /// The fault schedule.
    pub steps: Vec<Step>,
    /// One apply per EdgeNode, made after everything healed and converged.
    pub finals: Vec<(Side, Spec)>,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let drift = &self.drift_ms;
        writeln!(
            f,
            "seed {}: {} edge(s), drift intervals {drift:?} ms",
            self.seed, self.edges
        )?;
        for (i, step) in self.steps.iter().enumerate() {
            writeln!(f, "  {i:3}: {step:?}")?;
        }
        for (side, spec) in &self.finals {
            writeln!(f, "  final: {side:?} applies {spec:?}")?;
        }
        Ok(())
    }
}

/// What the planner knows: which daemons are up and what each side last applied.
struct Planner {
    rng: Rng,
    edges: usize,
    head_up: bool,
    edge_up: Vec<bool>,
    /// Per (side, key), the pods that side last applied.
    last: BTreeMap<(Side, String), BTreeMap<String, String>>,
    planted: Vec<Vec<usize>>,
}

impl Plan {
    /// The schedule of `seed`.
    pub fn new(seed: u64) -> Plan {
        let mut rng = Rng::with_seed(seed);
        let edges = rng.usize(1..=2);
        let drift_ms = (0..edges)
            .map(|_| [200, 1000, 3000][rng.usize(..3)])
            .collect();
        let count = rng.usize(20..=40);
        let mut planner = Planner {
            rng,
            edges,
            head_up: true,
            edge_up: vec![true; edges],
            last: BTreeMap::new(),
            planted: vec![Vec::new(); edges],
        };
        let steps = (0..count).map(|i| planner.step(i)).collect();
        let finals = (0..edges)
            .flat_map(|edge| NAMESPACES.map(|ns| (edge, ns)))
            .map(|(edge, namespace)| planner.final_edit(edge, namespace))
            .collect();
        Plan {
            seed,
            edges,
            drift_ms,
            steps,
            finals,
        }
    }
}

impl Planner {
    fn step(&mut self, i: usize) -> Step {
        let edge = self.rng.usize(..self.edges);
        match self.rng.u32(0..100) {
            0..=27 => self.apply(i, None),
            28..=33 => {
                let kill = Some(self.rng.u64(0..=15_000));
                self.apply(i, kill)
            }
            34..=39 => self.apply_both(i),
            40..=45 => match (self.head_up, self.rng.bool()) {
                (false, _) => {
                    self.head_up = true;
                    Step::StartHead
                }
                (true, true) => {
                    self.head_up = false;
                    Step::KillHead
                }
                (true, false) => Step::RestartHead,
            },
            46..=55 => match (self.edge_up[edge], self.rng.bool()) {
                (false, _) => {
                    self.edge_up[edge] = true;
                    Step::StartEdge(edge)
                }
                (true, true) => {
                    self.edge_up[edge] = false;
                    Step::KillEdge(edge)
                }
                (true, false) => Step::RestartEdge(edge),
            },
            56..=68 => Step::Link(edge, self.link_fault()),
            69..=77 => self.hand_edit(i, edge),
            78..=81 => self.delete(),
            82..=85 => self.plant(edge),
            86..=88 => {
                self.head_up = true;
                self.edge_up.fill(true);
                Step::Settle
            }
            _ => Step::Pause(self.rng.u64(100..=2000)),
        }
    }

    /// A fresh pod list for edge `edge`'s EdgeNode in `namespace`, applied on one side
    /// after everything healed.
    fn final_edit(&mut self, edge: usize, namespace: &str) -> (Side, Spec) {
        let rng = &mut self.rng;
        let on = if rng.bool() {
            Side::Head
        } else {
            Side::Edge(edge)
        };
        let mut pods = BTreeMap::new();
        for _ in 0..rng.usize(1..=3) {
            let pod = PODS[rng.usize(..PODS.len())];
            pods.insert(pod.to_string(), format!("{pod}:final"));
        }
        let namespace = namespace.to_string();
        let spec = Spec {
            namespace,
            edge,
            pods,
        };
        (on, spec)
    }

    /// A hand edit of a manifest on `edge`.
    fn hand_edit(&mut self, i: usize, edge: usize) -> Step {
        let namespace = NAMESPACES[self.rng.usize(..NAMESPACES.len())];
        let key = doc_key(namespace, edge);
        // A pod either side last asked for, most likely to have a manifest.
        let asked: Vec<&'static str> = PODS
            .into_iter()
            .filter(|p| {
                [Side::Head, Side::Edge(edge)].iter().any(|&side| {
                    self.last
                        .get(&(side, key.clone()))
                        .is_some_and(|pods| pods.contains_key(*p))
                })
            })
            .collect();
        let rng = &mut self.rng;
        let pod = rng
            .choice(asked)
            .unwrap_or_else(|| PODS[rng.usize(..PODS.len())]);
        let edit = match rng.u32(0..3) {
            0 => HandEdit::Delete,
            1 => HandEdit::Junk(["{\"hand\": \"edited\"}", "not even JSON", ""][rng.usize(..3)]),
            _ => HandEdit::Image(format!("hand:s{i}")),
        };
        Step::HandEdit {
            edge,
            namespace,
            pod,
            edit,
        }
    }

    /// Something foreign planted on `edge` (a pause once everything is).
    fn plant(&mut self, edge: usize) -> Step {
        let left: Vec<usize> = (0..FOREIGN.len())
            .filter(|f| !self.planted[edge].contains(f))
            .collect();
        match self.rng.choice(left) {
            Some(index) => {
                self.planted[edge].push(index);
                Step::Plant { edge, index }
            }
            None => Step::Pause(100),
        }
    }

    /// Applies on the head and an edge at once, both to the same EdgeNode or not (a single
    /// apply unless both are up).
    fn apply_both(&mut self, i: usize) -> Step {
        let up: Vec<usize> = (0..self.edges).filter(|&e| self.edge_up[e]).collect();
        let edge = match self.rng.choice(up) {
            Some(edge) if self.head_up => edge,
            _ => return self.apply(i, None),
        };
        let namespace = NAMESPACES[self.rng.usize(..NAMESPACES.len())];
        let other = NAMESPACES[self.rng.usize(..NAMESPACES.len())];
        Step::ApplyBoth {
            head: vec![self.edit(i, Side::Head, edge, namespace)],
            edge,
            on_edge: vec![self.edit(i, Side::Edge(edge), edge, other)],
        }
    }

    /// A delete on a side that is up (the head is started if none is).
    fn delete(&mut self) -> Step {
        let Some(on) = self.up_side() else {
            self.head_up = true;
            return Step::StartHead;
        };
        let edge = match on {
            Side::Head => self.rng.usize(..self.edges),
            Side::Edge(e) => e,
        };
        let namespace = NAMESPACES[self.rng.usize(..NAMESPACES.len())];
        self.last
            .insert((on, doc_key(namespace, edge)), BTreeMap::new());
        Step::Delete {
            on,
            namespace,
            edge,
        }
    }

    /// A side whose daemon is up, if any.
    fn up_side(&mut self) -> Option<Side> {
        let mut up: Vec<Side> = (0..self.edges)
            .filter(|&e| self.edge_up[e])
            .map(Side::Edge)
            .collect();
        if self.head_up {
            up.push(Side::Head);
        }
        self.rng.choice(up)
    }

    fn link_fault(&mut self) -> LinkFault {
        let rng = &mut self.rng;
        match rng.u32(0..100) {
            0..=24 => LinkFault::Cut,
            25..=32 => LinkFault::CutToHead,
            33..=40 => LinkFault::CutToEdge,
            41..=64 => LinkFault::Heal,
            _ => LinkFault::Degrade {
                drop: f64::from(rng.u32(0..=30)) / 100.0,
                delay_ms: rng.u64(0..=40),
                jitter_ms: rng.u64(0..=30),
                duplicate: f64::from(rng.u32(0..=20)) / 100.0,
            },
        }
    }

    /// An apply of one or two EdgeNodes on a side that is up (the head is started if none is).
    fn apply(&mut self, i: usize, kill_after_us: Option<u64>) -> Step {
        let Some(on) = self.up_side() else {
            self.head_up = true;
            return Step::StartHead;
        };
        let mut keys: Vec<(usize, &str)> = (0..self.edges)
            .filter(|&e| on == Side::Head || on == Side::Edge(e))
            .flat_map(|e| NAMESPACES.map(|ns| (e, ns)))
            .collect();
        self.rng.shuffle(&mut keys);
        keys.truncate(if self.rng.u32(0..4) == 0 { 2 } else { 1 });
        let specs = keys
            .into_iter()
            .map(|(edge, ns)| self.edit(i, on, edge, ns))
            .collect();
        if kill_after_us.is_some() {
            match on {
                Side::Head => self.head_up = false,
                Side::Edge(e) => self.edge_up[e] = false,
            }
        }
        Step::Apply {
            on,
            specs,
            kill_after_us,
        }
    }

    /// A small change to what this side (or else the other) last applied; now and then a
    /// fresh pod list. New images name the step and the side, so each value says which apply
    /// set it.
    fn edit(&mut self, i: usize, on: Side, edge: usize, namespace: &str) -> Spec {
        let key = doc_key(namespace, edge);
        let other = match on {
            Side::Head => Side::Edge(edge),
            Side::Edge(_) => Side::Head,
        };
        let rng = &mut self.rng;
        let mut pods = match rng.u32(0..10) {
            0 => None,
            1..=2 => self.last.get(&(other, key.clone())).cloned(),
            _ => self.last.get(&(on, key.clone())).cloned(),
        }
        .unwrap_or_default();
        for _ in 0..rng.usize(1..=2) {
            let pod = PODS[rng.usize(..PODS.len())];
            let side = if on == Side::Head { 'h' } else { 'e' };
            let image = format!("{pod}:s{i}{side}");
            match (pods.contains_key(pod), rng.bool()) {
                (true, true) => pods.remove(pod),
                _ => pods.insert(pod.to_string(), image),
            };
        }
        self.last.insert((on, key), pods.clone());
        Spec {
            namespace: namespace.to_string(),
            edge,
            pods,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_gives_the_same_plan_and_seeds_cover_every_kind_of_step() {
        assert_eq!(Plan::new(7).to_string(), Plan::new(7).to_string());
        assert_ne!(Plan::new(7).to_string(), Plan::new(8).to_string());
        let mut kinds = std::collections::BTreeSet::new();
        for seed in 0..50 {
            for step in Plan::new(seed).steps {
                let kind = format!("{step:?}");
                let kind = kind.split([' ', '(']).next().unwrap().to_string();
                let killed = matches!(
                    step,
                    Step::Apply {
                        kill_after_us: Some(_),
                        ..
                    }
                );
                kinds.insert(if killed { "Apply killed".into() } else { kind });
            }
        }
        let all = [
            "Apply",
            "Apply killed",
            "ApplyBoth",
            "Delete",
            "HandEdit",
            "KillEdge",
            "KillHead",
            "Link",
            "Pause",
            "Plant",
            "RestartEdge",
            "RestartHead",
            "Settle",
            "StartEdge",
            "StartHead",
        ];
        assert_eq!(kinds, all.iter().map(|k| k.to_string()).collect());
    }
}

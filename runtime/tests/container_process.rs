//! Root tests of what a container's processes get from `spawn` and `exec`, as Docker and podman
//! give it: an `exec`ed command leads its own session inside the container (CRIU can dump what
//! it leaves running), the user's supplementary groups from the image's /etc/group, and `HOME`
//! from its /etc/passwd when the environment has none.

mod container_support;

use container_support::{kv, no_cgroup, pipe, raw, read_to_end, spec, Fixture, Proc};
use mig_runtime::container::{exec, spawn, LaunchConfig};
use mig_runtime::spec::ContainerSpec;
use std::collections::BTreeSet;
use std::path::Path;

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
    postgres:x:101:103:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/sh\n";
const GROUP: &str = "root:x:0:\n\
    ssl-cert:x:101:postgres\n\
    postgres:x:103:\n\
    audio:x:29:pulse,postgres\n\
    wheel:x:10:root\n";

/// Prints the groups (sorted by the kernel), HOME and the session, one `key=value` per line.
const PROBE: &str = r#"
echo "groups=$(grep '^Groups:' /proc/self/status | cut -f2 | tr -s ' ' | sed 's/ *$//')"
echo "home=[$HOME]"
echo "pid=$$"
echo "sid=$(cut -d' ' -f6 /proc/$$/stat)"
"#;

fn fixture(test: &str) -> Fixture {
    let fx = Fixture::new(test);
    std::fs::write(fx.lower().join("etc/passwd"), PASSWD).unwrap();
    std::fs::write(fx.lower().join("etc/group"), GROUP).unwrap();
    fx
}

fn no_home(mut s: ContainerSpec) -> ContainerSpec {
    s.process.env.retain(|e| !e.starts_with("HOME="));
    s
}

fn run(s: &ContainerSpec, root: &Path) -> std::collections::HashMap<String, String> {
    let cg = no_cgroup();
    let (r, w) = pipe();
    let pid = spawn(&LaunchConfig {
        spec: s,
        rootfs: root,
        cgroup: &cg,
        output: raw(&w),
    })
    .expect("spawn");
    let mut init = Proc(pid);
    drop(w);
    let out = read_to_end(r);
    let status = init.wait();
    assert_eq!(status, 0, "output:\n{out}");
    kv(&out)
}

fn groups(s: &str) -> BTreeSet<u32> {
    s.split_whitespace().map(|g| g.parse().unwrap()).collect()
}

/// Runs the probe with `exec` in the running container `pid` and returns its output.
fn exec_probe(pid: i32, s: &ContainerSpec, root: &Path, env: &[String]) -> String {
    let _ = std::fs::remove_file(root.join("tmp/probe.out"));
    let args: Vec<String> = ["sh", "-c", &format!("({PROBE}) > /tmp/probe.out")]
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(exec(pid, s, &no_cgroup(), &args, env).expect("exec"), 0);
    std::fs::read_to_string(root.join("tmp/probe.out")).unwrap()
}

#[test]
fn the_init_gets_the_users_groups_and_home() {
    let mut fx = fixture("proc-init");
    let root = fx.mount("merged");
    let mut s = no_home(spec("proc-init", &["sh", "-c", PROBE]));
    s.process.uid = 101;
    s.process.gid = 103;
    let m = run(&s, &root);
    assert_eq!(groups(&m["groups"]), [29, 101, 103].into(), "{m:?}");
    assert_eq!(m["home"], "[/var/lib/postgresql]");
    // root: its own memberships, HOME from its entry.
    let s = no_home(spec("proc-init", &["sh", "-c", PROBE]));
    let m = run(&s, &root);
    assert_eq!(groups(&m["groups"]), [0, 10].into(), "{m:?}");
    assert_eq!(m["home"], "[/root]");
    // A uid without an entry: its gid only, HOME=/.
    let mut s = no_home(spec("proc-init", &["sh", "-c", PROBE]));
    s.process.uid = 4242;
    s.process.gid = 4243;
    let m = run(&s, &root);
    assert_eq!(groups(&m["groups"]), [4243].into(), "{m:?}");
    assert_eq!(m["home"], "[/]");
    // HOME from the image's config or -e is kept.
    let mut s = spec("proc-init", &["sh", "-c", PROBE]);
    s.process.env.push("HOME=/srv/x".into());
    s.process.env.retain(|e| e != "HOME=/root");
    assert_eq!(run(&s, &root)["home"], "[/srv/x]");
}

#[test]
fn an_exec_leads_its_own_session_and_gets_the_users_groups_and_home() {
    let mut fx = fixture("proc-exec");
    let root = fx.mount("merged");
    let s = no_home(spec("proc-exec", &["sleep", "1000"]));
    let cg = no_cgroup();
    let (_r, w) = pipe();
    let pid = spawn(&LaunchConfig {
        spec: &s,
        rootfs: &root,
        cgroup: &cg,
        output: raw(&w),
    })
    .expect("spawn");
    let _init = Proc(pid);

    let out = exec_probe(pid, &s, &root, &[]);
    let m = kv(&out);
    // Its session is its own, inside the container (0: a leader outside the pid namespace).
    assert_eq!(m["sid"], m["pid"], "{out}");
    assert_eq!(m["home"], "[/root]", "{out}");
    assert_eq!(groups(&m["groups"]), [0, 10].into(), "{out}");

    // `exec -u postgres`: the shim hands the user's ids in the spec.
    let mut as_pg = s.clone();
    as_pg.process.uid = 101;
    as_pg.process.gid = 103;
    let m = kv(&exec_probe(pid, &as_pg, &root, &[]));
    assert_eq!(groups(&m["groups"]), [29, 101, 103].into(), "{m:?}");
    assert_eq!(m["home"], "[/var/lib/postgresql]");
    // The container's files as they are now: a group added after the start counts.
    let etc_group = root.join("etc/group");
    let mut g = std::fs::read_to_string(&etc_group).unwrap();
    g.push_str("late:x:500:postgres\n");
    std::fs::write(&etc_group, g).unwrap();
    let m = kv(&exec_probe(pid, &as_pg, &root, &["HOME=/tmp".into()]));
    assert_eq!(groups(&m["groups"]), [29, 101, 103, 500].into(), "{m:?}");
    assert_eq!(m["home"], "[/tmp]", "exec -e HOME wins");

    // A background process the command leaves behind keeps that session, inside the container.
    let args: Vec<String> = ["sh", "-c", "sleep 1000 >/dev/null 2>&1 &"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(exec(pid, &s, &cg, &args, &[]).expect("exec"), 0);
    let args: Vec<String> = [
        "sh",
        "-c",
        "for p in /proc/[0-9]*; do c=$(cat $p/cmdline | tr '\\0' ' '); \
         [ \"$c\" = 'sleep 1000 ' ] && [ ${p#/proc/} != 1 ] && cut -d' ' -f6 $p/stat; done \
         > /tmp/bg.sid; exit 0",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    assert_eq!(exec(pid, &s, &cg, &args, &[]).expect("exec"), 0);
    let sid = std::fs::read_to_string(root.join("tmp/bg.sid")).unwrap();
    let sid: u32 = sid.trim().parse().unwrap_or_else(|_| panic!("{sid:?}"));
    assert!(
        sid > 1,
        "the background sleep's session is inside the container: {sid}"
    );
}

//! Broker-side faults on RabbitMQ 3.10 without the management plugin: the broker closes
//! single channels, or whole connections, of one vhost — so parallel tests on other vhosts of
//! the shared system broker are unaffected. Each function has an `_on` form that takes the
//! node (`None`: the system node, as `rabbitmqctl` without `-n` reaches it), and
//! [`RabbitNode`] has methods for its own node.
//!
//! **How a channel is closed.** `rabbitmqctl eval` lists the channel processes
//! (`rabbit_channel:list()`, cluster-wide), keeps those of the vhost, and injects into each
//! chosen one a `basic.ack` for a delivery tag that cannot exist
//! ([`INJECTED_DELIVERY_TAG`]) with `rabbit_channel:do/2`, as if its client had sent it. The
//! channel then fails the way a real channel-level error does: the broker sends
//! `channel.close` 406 PRECONDITION_FAILED "PRECONDITION_FAILED - unknown delivery tag
//! 999999999" to the client; its unacknowledged deliveries are requeued; the connection and
//! its other channels stay open.
//!
//! Killing a channel process instead (`exit(Pid, kill)`) does *not* do that: the connection
//! process treats a crashed channel as an internal error and closes the whole connection
//! with 541 INTERNAL_ERROR (tried on 3.10.8).
//!
//! **How connections are closed.** `rabbitmqctl close_all_connections --vhost <v> <reason>`:
//! the client gets `connection.close` 320 CONNECTION_FORCED "CONNECTION_FORCED - <reason>"
//! ([`CLOSE_REASON`]).

use super::rabbit_node::RabbitNode;
use std::process::{Command, Stdio};

/// The delivery tag acknowledged into a channel to make the broker close it.
pub const INJECTED_DELIVERY_TAG: u64 = 999_999_999;

/// The reason given when connections are closed.
pub const CLOSE_REASON: &str = "closed by the test (broker_faults)";

/// Makes the system broker close up to `how_many` channels of connections on `vhost` (ordered
/// by connection, then channel number); returns how many it closed.
pub fn close_channels_of_vhost(vhost: &str, how_many: usize) -> usize {
    close_channels_of_vhost_on(None, vhost, how_many)
}

/// Makes the system broker close every client connection on `vhost` (320 CONNECTION_FORCED).
pub fn close_connections_of_vhost(vhost: &str) {
    close_connections_of_vhost_on(None, vhost)
}

/// [`close_channels_of_vhost`] on `node` (None: the system node).
pub fn close_channels_of_vhost_on(node: Option<&str>, vhost: &str, how_many: usize) -> usize {
    let expr = format!(
        "V = {vhost}, \
         Chs = lists:sort([{{proplists:get_value(connection, I), proplists:get_value(number, I), P}} \
             || P <- rabbit_channel:list(), \
                I <- [catch rabbit_channel:info(P, [vhost, number, connection])], \
                is_list(I), proplists:get_value(vhost, I) =:= V]), \
         Pick = lists:sublist(Chs, {how_many}), \
         [rabbit_channel:do(P, {{'basic.ack', {INJECTED_DELIVERY_TAG}, false}}) || {{_, _, P}} <- Pick], \
         length(Pick).",
        vhost = erlang_binary(vhost),
    );
    let out = ctl(node, &["-q", "eval", &expr]);
    let text = out.trim();
    text.lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("rabbitmqctl eval (close channels) printed {text:?}"))
}

/// [`close_connections_of_vhost`] on `node` (None: the system node).
pub fn close_connections_of_vhost_on(node: Option<&str>, vhost: &str) {
    ctl(
        node,
        &[
            "-q",
            "close_all_connections",
            "--vhost",
            vhost,
            CLOSE_REASON,
        ],
    );
}

impl RabbitNode {
    /// [`close_channels_of_vhost`] on this node.
    pub fn close_channels_of_vhost(&self, vhost: &str, how_many: usize) -> usize {
        close_channels_of_vhost_on(Some(&self.name), vhost, how_many)
    }

    /// [`close_connections_of_vhost`] on this node.
    pub fn close_connections_of_vhost(&self, vhost: &str) {
        close_connections_of_vhost_on(Some(&self.name), vhost)
    }
}

/// `rabbitmqctl [-n node] args`, panicking with its output when it fails; its stdout.
fn ctl(node: Option<&str>, args: &[&str]) -> String {
    let mut cmd = Command::new("rabbitmqctl");
    if let Some(n) = node {
        cmd.arg("-n").arg(n);
    }
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("rabbitmqctl must be installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "rabbitmqctl {node:?} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `s` as an Erlang binary expression, byte by byte (no quoting issues whatever the name).
fn erlang_binary(s: &str) -> String {
    let bytes: Vec<String> = s.bytes().map(|b| b.to_string()).collect();
    format!("list_to_binary([{}])", bytes.join(","))
}

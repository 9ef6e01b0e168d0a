//! `lb` datapath. Thin entry points only: each hook calls the translation in [`sock`] and maps
//! its result to a verdict explicitly. Maps are in [`maps`]; layouts in lb-common.
#![no_std]
#![no_main]
// The workspace lints, with these exceptions for the kernel side:
#![expect(
    clippy::inline_always,
    reason = "every helper is inlined into its entry point: the verifier then sees one function with known bounds, and no BPF-to-BPF call costs stack or verification time"
)]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "aya-ebpf's map methods take `impl Borrow<K>`: a reference keeps the key in the caller's stack slot that the helper reads, as the verifier expects"
)]
#![expect(
    unreachable_pub,
    clippy::needless_pass_by_value,
    reason = "aya's program macros want the entry points `pub` and taking their context by value"
)]

mod family;
mod maps;
mod nodeport;
mod select;
mod sock;
mod xdp;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

/// cgroup sock_addr: let the syscall go on (with whatever address the program wrote).
const SYS_PROCEED: i32 = 1;
/// cgroup sock_addr: fail the syscall with the errno set by `bpf_set_retval` (EPERM if none).
const SYS_REJECT: i32 = 0;

#[inline(always)]
fn fwd_verdict(r: Result<(), sock::Reject>) -> i32 {
    match r {
        Ok(()) => SYS_PROCEED,
        Err(reject) => {
            sock::set_errno(reject);
            SYS_REJECT
        }
    }
}

/// `connect()` on an IPv4 socket: ClusterIP → backend, once per connection (TCP, UDP, SCTP).
#[cgroup_sock_addr(connect4)]
pub fn sock4_connect(ctx: SockAddrContext) -> i32 {
    fwd_verdict(sock::xlate4_fwd(&ctx, sock::Hook::Connect))
}

/// `sendmsg()`/`sendto()` with an address on an unconnected IPv4 UDP socket.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock4_sendmsg(ctx: SockAddrContext) -> i32 {
    fwd_verdict(sock::xlate4_fwd(&ctx, sock::Hook::Sendmsg))
}

/// `recvmsg()`/`recvfrom()` on an IPv4 UDP socket: backend source → VIP. Must return 1.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock4_recvmsg(ctx: SockAddrContext) -> i32 {
    sock::xlate4_rev(&ctx);
    SYS_PROCEED
}

/// `getpeername()` on an IPv4 socket: backend → VIP. Must return 1.
#[cgroup_sock_addr(getpeername4)]
pub fn sock4_getpeername(ctx: SockAddrContext) -> i32 {
    sock::xlate4_rev(&ctx);
    SYS_PROCEED
}

/// `connect()` on an IPv6 socket (IPv4-mapped destinations use the IPv4 service map).
#[cgroup_sock_addr(connect6)]
pub fn sock6_connect(ctx: SockAddrContext) -> i32 {
    fwd_verdict(sock::xlate6_fwd(&ctx, sock::Hook::Connect))
}

/// `sendmsg()` with an address on an unconnected IPv6 UDP socket.
#[cgroup_sock_addr(sendmsg6)]
pub fn sock6_sendmsg(ctx: SockAddrContext) -> i32 {
    fwd_verdict(sock::xlate6_fwd(&ctx, sock::Hook::Sendmsg))
}

/// `recvmsg()` on an IPv6 UDP socket. Must return 1.
#[cgroup_sock_addr(recvmsg6)]
pub fn sock6_recvmsg(ctx: SockAddrContext) -> i32 {
    sock::xlate6_rev(&ctx);
    SYS_PROCEED
}

/// `getpeername()` on an IPv6 socket. Must return 1.
#[cgroup_sock_addr(getpeername6)]
pub fn sock6_getpeername(ctx: SockAddrContext) -> i32 {
    sock::xlate6_rev(&ctx);
    SYS_PROCEED
}

/// tcx ingress on node interfaces: NodePort / externalIPs / LoadBalancer IPs from outside,
/// and replies of SNATed flows. Returns a TC action (`TC_ACT_OK`, `_SHOT`, `_REDIRECT`).
#[xdp]
pub fn xdp_nodeport(ctx: XdpContext) -> u32 {
    xdp::handle(&ctx)
}

#[classifier]
pub fn tc_nodeport_ingress(ctx: TcContext) -> i32 {
    nodeport::handle(&ctx, nodeport::Dir::Ingress)
}

/// tcx egress on node interfaces: replies of flows DNATed to a backend on this node.
#[classifier]
pub fn tc_nodeport_egress(ctx: TcContext) -> i32 {
    nodeport::handle(&ctx, nodeport::Dir::Egress)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// GPL-compatible: `bpf_get_socket_cookie` and friends are fine either way, but the TC/XDP
/// helpers later issues need are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

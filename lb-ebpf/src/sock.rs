//! Socket-level load balancing: the destination of `connect()` / `sendmsg()` is rewritten once
//! from a frontend (VIP:port) to a backend, and `getpeername()` / `recvmsg()` show the VIP again.
//!
//! Forward path (connect, sendmsg):
//! 1. exact frontend lookup {vip, port, proto, slot 0};
//! 2. miss → VIP marker lookup {vip, 0, 0, slot 0}: hit = known VIP, port not served → REJECT,
//!    miss = not a service → the syscall proceeds untouched;
//! 3. hit with count 0 → REJECT (no usable endpoint);
//! 4. uniform random slot in 1..=count → backend id → backend address;
//! 5. remember backend → VIP for the reverse path (connect: in the ring slot of the socket's
//!    cookie, moved into the socket's own storage when it first asks for its peer; sendmsg:
//!    {socket cookie, backend} in an LRU map); rewrite the address.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    AffKey, RevNat4Key, RevNat4Value, RevNat6Key, RevNat6Value, RevNatRing, RevNatSk, SCOPE_ALL,
    SVC_FLAG_HOST_ONLY, SVC_FLAG_NO_LOCAL, SVC_FLAG_NODE_DNS, SVC_FLAG_VIP_MARKER, Stat, SvcValue,
};

use crate::{
    family::{Backend, Family, SvcKey, V4, V6},
    select::{Hash, Pins},
};

/// The host's netns cookie, set by the agent at load time (`lb_common::GLOBAL_HOST_NETNS`).
#[unsafe(no_mangle)]
static LB_HOST_NETNS: u64 = 0;

/// Is this socket in the host's network namespace?
#[inline(always)]
fn from_host(ctx: &SockAddrContext) -> bool {
    // SAFETY: reading a load-time constant; volatile so the compiler keeps the load (the
    // loader patches the value after compilation).
    let host = unsafe { core::ptr::read_volatile(&raw const LB_HOST_NETNS) };
    // SAFETY: helper taking the program context.
    host != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == host
}

use crate::maps::{
    LB_AFF_V1, LB_NODE_DNS_V1, LB_RNAT_RING_V1, LB_RNAT_SKS_V1, LB4_RNAT_SK_V1, LB6_RNAT_SK_V1,
    count, count_frontend,
};

/// The reverse-NAT ring's index mask (entries − 1), set by the agent at load time
/// (`lb_common::GLOBAL_RNAT_RING_MASK`).
#[unsafe(no_mangle)]
static LB_RNAT_RING_MASK: u32 = 0;

const ECONNREFUSED: i32 = 111;
const ETIMEDOUT: i32 = 110;

/// Which forward hook is running (only changes which counter is bumped).
#[derive(Clone, Copy)]
pub(crate) enum Hook {
    Connect,
    Sendmsg,
}

/// Why a forward translation refused the syscall: ECONNREFUSED (REJECT), except `NoLocal`
/// (DROP), which fails with ETIMEDOUT.
#[derive(Clone, Copy)]
pub(crate) enum Reject {
    NoBackend,
    NoPort,
    BackendMissing,
    NoLocal,
}

/// Counts `reject` and sets the errno the rejected syscall fails with (instead of EPERM).
///
/// `bpf_set_retval` for cgroup programs: Linux 5.18, commit b44123b4a3dc ("bpf: Add cgroup
/// helpers bpf_{get,set}_retval to get/set syscall return value").
#[inline(always)]
pub(crate) fn set_errno(reject: Reject) {
    let (stat, errno) = match reject {
        Reject::NoBackend => (Stat::RejectNoBackend, ECONNREFUSED),
        Reject::NoPort => (Stat::RejectNoPort, ECONNREFUSED),
        Reject::BackendMissing => (Stat::RejectBackendMissing, ECONNREFUSED),
        Reject::NoLocal => (Stat::DropNoLocal, ETIMEDOUT),
    };
    count(stat);
    // SAFETY: helper call with a plain integer; valid in every cgroup sock_addr hook.
    let _ = unsafe { bpf_set_retval(-errno) };
}

#[inline(always)]
fn count_fwd(hook: Hook) {
    count(match hook {
        Hook::Connect => Stat::ConnectXlated,
        Hook::Sendmsg => Stat::SendmsgXlated,
    });
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: `bpf_get_socket_cookie` takes the program context; always valid here.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Why a frontend without usable endpoints refuses: DROP for Local policy with endpoints
/// elsewhere, else REJECT.
#[inline(always)]
fn no_endpoint(fe: &SvcValue) -> Reject {
    if fe.flags & SVC_FLAG_NO_LOCAL != 0 {
        Reject::NoLocal
    } else {
        Reject::NoBackend
    }
}

/// Frontend entry for an exact key, or the reason to reject when only the VIP is known.
/// `Ok(None)`: not a service address at all.
#[inline(always)]
fn frontend<F: Family>(
    ctx: &SockAddrContext,
    key: &SvcKey<F::A>,
    marker: &SvcKey<F::A>,
) -> Result<Option<SvcValue>, Reject> {
    match F::svc(key) {
        Some(fe) if fe.flags & SVC_FLAG_HOST_ONLY != 0 && !from_host(ctx) => Ok(None),
        Some(fe) if fe.flags & SVC_FLAG_VIP_MARKER != 0 => Err(Reject::NoPort),
        // Node-local DNS may be served without endpoints: `select` decides.
        Some(fe) if fe.flags & SVC_FLAG_NODE_DNS != 0 => Ok(Some(fe)),
        Some(fe) if fe.count == 0 => Err(no_endpoint(&fe)),
        Some(fe) => Ok(Some(fe)),
        None if F::svc(marker).is_some() => Err(Reject::NoPort),
        None => Ok(None),
    }
}

/// Chooses a backend for `vip:port/proto` into `be` ([`crate::select`]: the pod's pinned
/// backend while affinity holds, else a uniformly random slot) and counts the connection on
/// its frontend. `Ok(false)`: not a service.
///
/// `bpf_get_netns_cookie` in cgroup sock_addr hooks: Linux 5.7, commit f318903c0bf4 ("bpf: Add
/// netns cookie and enable it for bpf cgroup hooks").
#[inline(always)]
fn select<F: Family>(
    ctx: &SockAddrContext,
    vip: F::A,
    dport: u16,
    proto: u8,
    be: &mut Backend<F::A>,
) -> Result<bool, Reject> {
    let key = SvcKey::frontend(vip, dport, proto, SCOPE_ALL);
    let marker = SvcKey {
        dport: 0,
        proto: 0,
        ..key
    };
    let Some(fe) = frontend::<F>(ctx, &key, &marker)? else {
        return Ok(false);
    };
    if fe.flags & SVC_FLAG_NODE_DNS != 0 {
        if node_dns::<F>(be) {
            count_frontend(fe.backend_id);
            return Ok(true);
        }
        if fe.count == 0 {
            return Err(no_endpoint(&fe));
        }
    }
    let pins = Pins {
        map: &LB_AFF_V1,
        hit: Stat::AffinityHit,
        pin: Some(Stat::AffinityPin),
    };
    let pod = || AffKey {
        // SAFETY: helper taking the program context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        frontend_id: fe.backend_id,
        _pad: 0,
    };
    if crate::select::backend::<F, _, _>(&fe, &key, Hash::None, &pins, pod, be) == 0 {
        return Err(Reject::BackendMissing);
    }
    count_frontend(fe.backend_id);
    Ok(true)
}

/// Node-local DNS: the agent's listener into `be` while its lease holds (`false`: expired or
/// none of this family; the frontend's endpoints serve instead).
#[inline(always)]
fn node_dns<F: Family>(be: &mut Backend<F::A>) -> bool {
    let Some(v) = LB_NODE_DNS_V1.get(0) else {
        return false;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let (address, port) = F::node_dns(v);
    if port == 0 || v.expires_ns <= now {
        return false;
    }
    be.address = address;
    be.port = port;
    true
}

/// Copies `*src` to `*dst` word by word: a struct copy compiles to a byte loop the verifier
/// refuses without `CAP_PERFMON`. For the 8-byte-aligned reverse-NAT records.
///
/// # Safety
/// Both must point at a valid, 8-byte-aligned `T` whose size is a multiple of 8.
#[inline(always)]
unsafe fn copy_record<T>(src: *const T, dst: *mut T) {
    let (src, dst) = (src.cast::<u64>(), dst.cast::<u64>());
    for i in 0..core::mem::size_of::<T>() / 8 {
        // SAFETY: the caller's contract; volatile keeps these word copies.
        unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
    }
}

/// The ring slot of socket cookie `c`.
#[inline(always)]
fn ring_slot(c: u64) -> Option<*mut RevNatRing> {
    // SAFETY: read of a load-time constant (volatile: patched after compilation).
    let mask = unsafe { core::ptr::read_volatile(&raw const LB_RNAT_RING_MASK) };
    // The verifier inlines array lookups: no helper call.
    LB_RNAT_RING_V1.get_ptr_mut((c as u32) & mask)
}

/// Connect: the record in the ring slot of this socket's cookie — a helper call for the cookie
/// and six stores, where creating socket storage costs about as much as the rest of the hook.
#[inline(always)]
fn remember_ring(ctx: &SockAddrContext, v: &RevNatSk) -> bool {
    let c = cookie(ctx);
    let Some(p) = ring_slot(c) else {
        return false;
    };
    let rec = RevNatRing { cookie: c, sk: *v };
    // SAFETY: `p` is an array value (valid while the program runs), `rec` a local; both are
    // 8-byte-aligned `RevNatRing`s.
    unsafe { copy_record(&raw const rec, p) };
    true
}

/// The socket's own storage, written with `v` (created when new). `false` when the kernel
/// could not allocate it.
#[inline(always)]
fn remember_sk(ctx: &SockAddrContext, v: &RevNatSk) -> bool {
    // SAFETY: `ctx` is a sock_addr context, whose socket the helper takes; F_CREATE returns
    // this socket's value (zeroed when new) or null.
    let p = unsafe { LB_RNAT_SKS_V1.get_or_insert_ptr_mut(ctx, None) };
    if p.is_null() {
        return false;
    }
    // SAFETY: both point at an 8-byte-aligned `RevNatSk` (the map value is this socket's,
    // valid while the program runs).
    unsafe { copy_record(v, p) };
    true
}

/// The VIP of this socket's translated `connect()`, when it went to `backend:port`.
///
/// The ring slot first: `connect()` always writes it, so a slot holding this socket's cookie is
/// its latest connect. Then the record is moved into the socket's own storage, so that it
/// outlives the slot (taken by a later socket after `mask + 1` more cookies). Without a ring
/// record, the socket's storage from an earlier read.
#[inline(always)]
fn recall_sk(ctx: &SockAddrContext, backend: &[u8; 16], port: u16) -> Option<([u8; 16], u16)> {
    let c = cookie(ctx);
    if let Some(p) = ring_slot(c) {
        let mut r = RevNatRing::default();
        // SAFETY: as in `remember_ring`, in the other direction.
        unsafe { copy_record(p, &raw mut r) };
        if r.cookie == c && r.sk.backend == *backend && r.sk.backend_port == port {
            let _ = remember_sk(ctx, &r.sk);
            return Some((r.sk.vip, r.sk.vip_port));
        }
    }
    // SAFETY: lookup without create; null when this socket has none.
    let p = unsafe { LB_RNAT_SKS_V1.get_ptr_mut(ctx) };
    if p.is_null() {
        return None;
    }
    let mut v = RevNatSk::default();
    // SAFETY: as in `remember_sk`, in the other direction.
    unsafe { copy_record(p, &raw mut v) };
    (v.backend == *backend && v.backend_port == port).then_some((v.vip, v.vip_port))
}

#[inline(always)]
fn remember4(ctx: &SockAddrContext, hook: Hook, be: &Backend<[u8; 4]>, vip: [u8; 4], vport: u16) {
    if matches!(hook, Hook::Connect)
        && remember_ring(
            ctx,
            &RevNatSk {
                backend: map_v4(be.address),
                vip: map_v4(vip),
                backend_port: be.port,
                vip_port: vport,
                _pad: 0,
            },
        )
    {
        return;
    }
    let key = RevNat4Key {
        cookie: cookie(ctx),
        address: be.address,
        port: be.port,
        _pad: [0; 2],
    };
    let val = RevNat4Value {
        address: vip,
        port: vport,
        _pad: [0; 2],
    };
    // Unconnected UDP sends many datagrams per socket: skip the write when nothing changed.
    // SAFETY: read-only copy of an LRU entry.
    if unsafe { LB4_RNAT_SK_V1.get(&key) }.is_some_and(|old| *old == val) {
        return;
    }
    if LB4_RNAT_SK_V1.insert(&key, &val, 0).is_err() {
        count(Stat::RevNatUpdateFailed);
    }
}

/// connect4 / sendmsg4.
#[inline(always)]
pub(crate) fn xlate4_fwd(ctx: &SockAddrContext, hook: Hook) -> Result<(), Reject> {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel's bpf_sock_addr for this invocation; these fields are readable
    // in connect4/sendmsg4.
    let (ip, port, proto) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let vip = ip.to_ne_bytes();
    let vport = u16::from_be(port as u16);
    let mut be = Backend::NONE;
    if !select::<V4>(ctx, vip, vport, proto as u8, &mut be)? {
        return Ok(());
    }
    remember4(ctx, hook, &be, vip, vport);
    // SAFETY: user_ip4/user_port are writable (4-byte stores) in connect4/sendmsg4.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(be.address);
        (*sa).user_port = u32::from(be.port.to_be());
    }
    count_fwd(hook);
    Ok(())
}

/// The VIP a socket addressed, given the backend it talks to.
#[inline(always)]
fn recall4(ctx: &SockAddrContext, address: [u8; 4], port: u16) -> Option<RevNat4Value> {
    if let Some((vip, vport)) = recall_sk(ctx, &map_v4(address), port) {
        let mut v4 = [0u8; 4];
        v4.copy_from_slice(&vip[12..]);
        return Some(RevNat4Value {
            address: v4,
            port: vport,
            _pad: [0; 2],
        });
    }
    let key = RevNat4Key {
        cookie: cookie(ctx),
        address,
        port,
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    unsafe { LB4_RNAT_SK_V1.get(&key) }.copied()
}

/// getpeername4 / recvmsg4: backend → VIP when this socket was translated.
#[inline(always)]
pub(crate) fn xlate4_rev(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: readable in getpeername4/recvmsg4.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    if let Some(v) = recall4(ctx, ip.to_ne_bytes(), u16::from_be(port as u16)) {
        // SAFETY: writable in getpeername4/recvmsg4.
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes(v.address);
            (*sa).user_port = u32::from(v.port.to_be());
        }
        count(Stat::RevNatHit);
    }
}

// ---------------------------------------------------------------------------------------------
// IPv6 (and IPv4-mapped IPv6 on dual-stack sockets, served from the IPv4 maps)
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn read_ip6(ctx: &SockAddrContext) -> [u8; 16] {
    let sa = ctx.sock_addr;
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        // SAFETY: user_ip6 words are readable 4 bytes at a time in every sock_addr hook.
        let w = unsafe { core::ptr::read_volatile(&raw const (*sa).user_ip6[i]) };
        out[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        i += 1;
    }
    out
}

#[inline(always)]
fn write_ip6(ctx: &SockAddrContext, a: &[u8; 16]) {
    let sa = ctx.sock_addr;
    let mut i = 0;
    while i < 4 {
        let w = u32::from_ne_bytes([a[i * 4], a[i * 4 + 1], a[i * 4 + 2], a[i * 4 + 3]]);
        // SAFETY: user_ip6 words are writable 4 bytes at a time in the hooks that call this.
        unsafe { core::ptr::write_volatile(&raw mut (*sa).user_ip6[i], w) };
        i += 1;
    }
}

#[inline(always)]
fn read_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: readable in every sock_addr hook.
    u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16)
}

#[inline(always)]
fn write_port(ctx: &SockAddrContext, port: u16) {
    // SAFETY: writable in the hooks that call this.
    unsafe { (*ctx.sock_addr).user_port = u32::from(port.to_be()) };
}

/// `::ffff:a.b.c.d` → `a.b.c.d`.
#[inline(always)]
fn v4_mapped(a: &[u8; 16]) -> Option<[u8; 4]> {
    let prefix = a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9];
    (prefix == 0 && a[10] == 0xff && a[11] == 0xff).then_some([a[12], a[13], a[14], a[15]])
}

#[inline(always)]
fn map_v4(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// connect6 / sendmsg6.
#[inline(always)]
pub(crate) fn xlate6_fwd(ctx: &SockAddrContext, hook: Hook) -> Result<(), Reject> {
    let vip = read_ip6(ctx);
    let vport = read_port(ctx);
    // SAFETY: readable in connect6/sendmsg6.
    let proto = unsafe { (*ctx.sock_addr).protocol } as u8;

    if let Some(vip4) = v4_mapped(&vip) {
        let mut be = Backend::NONE;
        if !select::<V4>(ctx, vip4, vport, proto, &mut be)? {
            return Ok(());
        }
        remember4(ctx, hook, &be, vip4, vport);
        write_ip6(ctx, &map_v4(be.address));
        write_port(ctx, be.port);
        count_fwd(hook);
        return Ok(());
    }

    let mut be = Backend::NONE;
    if !select::<V6>(ctx, vip, vport, proto, &mut be)? {
        return Ok(());
    }
    let in_sk = matches!(hook, Hook::Connect)
        && remember_ring(
            ctx,
            &RevNatSk {
                backend: be.address,
                vip,
                backend_port: be.port,
                vip_port: vport,
                _pad: 0,
            },
        );
    if !in_sk {
        let key = RevNat6Key {
            cookie: cookie(ctx),
            address: be.address,
            port: be.port,
            _pad: 0,
            _pad2: 0,
        };
        let val = RevNat6Value {
            address: vip,
            port: vport,
            _pad: [0; 2],
        };
        // SAFETY: read-only copy of an LRU entry.
        let same = unsafe { LB6_RNAT_SK_V1.get(&key) }.is_some_and(|old| *old == val);
        if !same && LB6_RNAT_SK_V1.insert(&key, &val, 0).is_err() {
            count(Stat::RevNatUpdateFailed);
        }
    }
    write_ip6(ctx, &be.address);
    write_port(ctx, be.port);
    count_fwd(hook);
    Ok(())
}

/// getpeername6 / recvmsg6.
#[inline(always)]
pub(crate) fn xlate6_rev(ctx: &SockAddrContext) {
    let addr = read_ip6(ctx);
    let port = read_port(ctx);
    if let Some(a4) = v4_mapped(&addr) {
        if let Some(v) = recall4(ctx, a4, port) {
            write_ip6(ctx, &map_v4(v.address));
            write_port(ctx, v.port);
            count(Stat::RevNatHit);
        }
        return;
    }
    if let Some((vip, vport)) = recall_sk(ctx, &addr, port) {
        write_ip6(ctx, &vip);
        write_port(ctx, vport);
        count(Stat::RevNatHit);
        return;
    }
    let key = RevNat6Key {
        cookie: cookie(ctx),
        address: addr,
        port,
        _pad: 0,
        _pad2: 0,
    };
    // SAFETY: copied out at once.
    if let Some(v) = unsafe { LB6_RNAT_SK_V1.get(&key) }.copied() {
        write_ip6(ctx, &v.address);
        write_port(ctx, v.port);
        count(Stat::RevNatHit);
    }
}

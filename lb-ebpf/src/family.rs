//! An address family of the datapath. The map layouts of lb-common come in pairs (`Svc4Key` /
//! `Svc6Key`, `Ct4Value` / `Ct6Value`, …) that differ only in the address; here each pair is one
//! generic layout over the address (`SvcKey<A>`, `CtVal<A>`, …), and [`Family`] says where a
//! family's maps are. Everything that balances a socket or a packet — frontend lookup, backend
//! choice, conntrack — is written once over `F: Family`; [`V4`] and [`V6`] are the only places
//! that name a family's maps.
//!
//! The maps keep lb-common's concrete types (their BTF names are what `bpftool map dump`
//! prints); a generic layout is the same `repr(C)` struct field for field, which the `const`
//! assertions below check, so a reference to one is a reference to the other.
use aya_ebpf::maps::lpm_trie::Key as LpmKey;
use lb_common::{
    Backend4, Backend6, Ct4Key, Ct4Value, Ct6Key, Ct6Value, SRCR4_FRONTEND_BITS,
    SRCR6_FRONTEND_BITS, SrcRange4, SrcRange6, Svc4Key, Svc6Key, SvcValue,
    maglev::{flow_hash4, flow_hash6},
};

use crate::maps::{
    LB4_BE_V1, LB4_CT_V1, LB4_SRCR_V1, LB4_SVC_V1, LB6_BE_V1, LB6_CT_V1, LB6_SRCR_V1, LB6_SVC_V1,
};

/// An address: `[u8; 4]` or `[u8; 16]`, network order.
pub(crate) trait Addr: Copy + PartialEq + 'static {
    const ZERO: Self;
}
impl Addr for [u8; 4] {
    const ZERO: Self = [0; 4];
}
impl Addr for [u8; 16] {
    const ZERO: Self = [0; 16];
}

/// `Svc4Key` / `Svc6Key`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SvcKey<A> {
    pub(crate) address: A,
    pub(crate) dport: u16,
    pub(crate) backend_slot: u16,
    pub(crate) proto: u8,
    pub(crate) scope: u8,
    pub(crate) _pad: [u8; 2],
}

/// `Backend4` / `Backend6`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Backend<A> {
    pub(crate) address: A,
    pub(crate) port: u16,
    pub(crate) proto: u8,
    pub(crate) flags: u8,
}

/// `Ct4Key` / `Ct6Key`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct CtKey<A> {
    pub(crate) src: A,
    pub(crate) dst: A,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) proto: u8,
    pub(crate) dir: u8,
    pub(crate) _pad: [u8; 2],
}

/// `Ct4Value` / `Ct6Value` (meaning of `addr` / `nat_addr` by direction: lb-common's `nat`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct CtVal<A> {
    pub(crate) addr: A,
    pub(crate) nat_addr: A,
    pub(crate) port: u16,
    pub(crate) nat_port: u16,
    pub(crate) flags: u16,
    pub(crate) _pad: u16,
    pub(crate) frontend_id: u32,
    pub(crate) backend_id: u32,
    pub(crate) expires_ns: u64,
}

impl<A: Addr> SvcKey<A> {
    /// The frontend entry (slot 0) of `address:dport/proto` in `scope`.
    #[inline(always)]
    pub(crate) const fn frontend(address: A, dport: u16, proto: u8, scope: u8) -> Self {
        Self {
            address,
            dport,
            backend_slot: 0,
            proto,
            scope,
            _pad: [0; 2],
        }
    }
}

impl<A: Addr> Backend<A> {
    pub(crate) const NONE: Self = Self {
        address: A::ZERO,
        port: 0,
        proto: 0,
        flags: 0,
    };
}

impl<A: Addr> CtKey<A> {
    #[inline(always)]
    pub(crate) const fn new(src: A, dst: A, sport: u16, dport: u16, proto: u8, dir: u8) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            proto,
            dir,
            _pad: [0; 2],
        }
    }
}

/// `&T` as `&U`, for two `repr(C)` layouts checked equal (see the assertions below).
#[inline(always)]
const fn view<T, U>(t: &T) -> &U {
    const {
        assert!(core::mem::size_of::<T>() == core::mem::size_of::<U>());
        assert!(core::mem::align_of::<T>() == core::mem::align_of::<U>());
    }
    // SAFETY: same size and alignment (checked above) and the same fields at the same offsets
    // (checked below for every pair this is used on); every bit pattern is valid in both.
    unsafe { &*core::ptr::from_ref(t).cast::<U>() }
}

/// One address family's maps.
pub(crate) trait Family: 'static {
    type A: Addr;

    /// A service map entry (frontend or slot), copied out.
    fn svc(key: &SvcKey<Self::A>) -> Option<SvcValue>;

    /// Backend `id`, copied out.
    fn backend(id: u32) -> Option<Backend<Self::A>>;

    /// The conntrack entry at `key`, in place.
    fn ct(key: &CtKey<Self::A>) -> Option<*mut CtVal<Self::A>>;

    /// Writes a conntrack entry (`flags`: `BPF_ANY` 0, `BPF_NOEXIST` 1).
    fn ct_insert(key: &CtKey<Self::A>, v: &CtVal<Self::A>, flags: u64) -> bool;

    fn ct_remove(key: &CtKey<Self::A>);

    /// Is `client` in the `loadBalancerSourceRanges` of frontend `fe:port/proto`?
    fn source_allowed(fe: &Self::A, port: u16, proto: u8, client: &Self::A) -> bool;

    /// The flow hash of a 5-tuple, the same on every node (Maglev).
    fn hash(src: &Self::A, dst: &Self::A, sport: u16, dport: u16, proto: u8) -> u32;

    /// A client address as the affinity maps key it (IPv4 as IPv4-mapped IPv6).
    fn client(a: &Self::A) -> [u8; 16];

    /// This family's node-local DNS listener (`port` 0: none).
    fn node_dns(v: &lb_common::NodeDns) -> (Self::A, u16);
}

/// The slot-`slot` backend id of the frontend at `key`, 0 when the slot is missing.
#[inline(always)]
pub(crate) fn slot<F: Family>(key: &SvcKey<F::A>, slot: u16) -> u32 {
    match F::svc(&SvcKey {
        backend_slot: slot,
        ..*key
    }) {
        Some(v) => v.backend_id,
        None => 0,
    }
}

pub(crate) struct V4;
pub(crate) struct V6;

impl Family for V4 {
    type A = [u8; 4];

    #[inline(always)]
    fn svc(key: &SvcKey<[u8; 4]>) -> Option<SvcValue> {
        // SAFETY: copied out at once; the agent replaces values whole (hash map updates are
        // atomic per element).
        unsafe { LB4_SVC_V1.get(view::<_, Svc4Key>(key)) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Backend<[u8; 4]>> {
        // SAFETY: copied out at once, as above.
        unsafe { LB4_BE_V1.get(&id) }.map(|b| *view::<Backend4, _>(b))
    }

    #[inline(always)]
    fn ct(key: &CtKey<[u8; 4]>) -> Option<*mut CtVal<[u8; 4]>> {
        LB4_CT_V1
            .get_ptr_mut(view::<_, Ct4Key>(key))
            .map(<*mut Ct4Value>::cast)
    }

    #[inline(always)]
    fn ct_insert(key: &CtKey<[u8; 4]>, v: &CtVal<[u8; 4]>, flags: u64) -> bool {
        LB4_CT_V1
            .insert(view::<_, Ct4Key>(key), view::<_, Ct4Value>(v), flags)
            .is_ok()
    }

    #[inline(always)]
    fn ct_remove(key: &CtKey<[u8; 4]>) {
        let _ = LB4_CT_V1.remove(view::<_, Ct4Key>(key));
    }

    #[inline(always)]
    fn source_allowed(fe: &[u8; 4], port: u16, proto: u8, client: &[u8; 4]) -> bool {
        let k = LpmKey::new(
            SRCR4_FRONTEND_BITS + 32,
            SrcRange4 {
                frontend: *fe,
                port_be: port.to_be_bytes(),
                proto,
                _pad: 0,
                client: *client,
            },
        );
        LB4_SRCR_V1.get(&k).is_some()
    }

    #[inline(always)]
    fn hash(src: &[u8; 4], dst: &[u8; 4], sport: u16, dport: u16, proto: u8) -> u32 {
        flow_hash4(*src, *dst, sport, dport, proto)
    }

    #[inline(always)]
    fn client(a: &[u8; 4]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[10] = 0xff;
        c[11] = 0xff;
        c[12..].copy_from_slice(a);
        c
    }

    #[inline(always)]
    fn node_dns(v: &lb_common::NodeDns) -> ([u8; 4], u16) {
        (v.addr4, v.port4)
    }
}

impl Family for V6 {
    type A = [u8; 16];

    #[inline(always)]
    fn svc(key: &SvcKey<[u8; 16]>) -> Option<SvcValue> {
        // SAFETY: as for IPv4.
        unsafe { LB6_SVC_V1.get(view::<_, Svc6Key>(key)) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Backend<[u8; 16]>> {
        // SAFETY: as for IPv4.
        unsafe { LB6_BE_V1.get(&id) }.map(|b| *view::<Backend6, _>(b))
    }

    #[inline(always)]
    fn ct(key: &CtKey<[u8; 16]>) -> Option<*mut CtVal<[u8; 16]>> {
        LB6_CT_V1
            .get_ptr_mut(view::<_, Ct6Key>(key))
            .map(<*mut Ct6Value>::cast)
    }

    #[inline(always)]
    fn ct_insert(key: &CtKey<[u8; 16]>, v: &CtVal<[u8; 16]>, flags: u64) -> bool {
        LB6_CT_V1
            .insert(view::<_, Ct6Key>(key), view::<_, Ct6Value>(v), flags)
            .is_ok()
    }

    #[inline(always)]
    fn ct_remove(key: &CtKey<[u8; 16]>) {
        let _ = LB6_CT_V1.remove(view::<_, Ct6Key>(key));
    }

    #[inline(always)]
    fn source_allowed(fe: &[u8; 16], port: u16, proto: u8, client: &[u8; 16]) -> bool {
        let k = LpmKey::new(
            SRCR6_FRONTEND_BITS + 128,
            SrcRange6 {
                frontend: *fe,
                port_be: port.to_be_bytes(),
                proto,
                _pad: 0,
                client: *client,
            },
        );
        LB6_SRCR_V1.get(&k).is_some()
    }

    #[inline(always)]
    fn hash(src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16, proto: u8) -> u32 {
        flow_hash6(src, dst, sport, dport, proto)
    }

    #[inline(always)]
    fn client(a: &[u8; 16]) -> [u8; 16] {
        *a
    }

    #[inline(always)]
    fn node_dns(v: &lb_common::NodeDns) -> ([u8; 16], u16) {
        (v.addr6, v.port6)
    }
}

/// The generic layouts are lb-common's, field for field.
const _: () = {
    use core::mem::offset_of;
    macro_rules! same {
        ($g:ty, $c:ty: $($f:ident),+) => {
            assert!(core::mem::size_of::<$g>() == core::mem::size_of::<$c>());
            $(assert!(offset_of!($g, $f) == offset_of!($c, $f));)+
        };
    }
    same!(SvcKey<[u8; 4]>, Svc4Key: address, dport, backend_slot, proto, scope, _pad);
    same!(SvcKey<[u8; 16]>, Svc6Key: address, dport, backend_slot, proto, scope, _pad);
    same!(Backend<[u8; 4]>, Backend4: address, port, proto, flags);
    same!(Backend<[u8; 16]>, Backend6: address, port, proto, flags);
    same!(CtKey<[u8; 4]>, Ct4Key: src, dst, sport, dport, proto, dir, _pad);
    same!(CtKey<[u8; 16]>, Ct6Key: src, dst, sport, dport, proto, dir, _pad);
    same!(CtVal<[u8; 4]>, Ct4Value: addr, nat_addr, port, nat_port, flags, _pad, frontend_id,
        backend_id, expires_ns);
    same!(CtVal<[u8; 16]>, Ct6Value: addr, nat_addr, port, nat_port, flags, _pad, frontend_id,
        backend_id, expires_ns);
};

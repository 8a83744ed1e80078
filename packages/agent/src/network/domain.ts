/**
 * The network domain: networks (a bridge with an IPv4 subnet) and ports (a tap per VM NIC), ids and
 * names, CIDR arithmetic and address allocation. Plain TypeScript, no I/O.
 */
import { failedPrecondition, invalidArgument } from "@vmenv/rpc/errors";
import { type Cidr, formatIp, parseCidr, parseIp } from "@vmenv/rpc/ipv4";

export {
  allocateIp,
  type Cidr,
  checkHostAddress,
  cidrText,
  contains,
  formatIp,
  parseCidr,
  parseIp,
} from "@vmenv/rpc/ipv4";

export type NetworkState = "creating" | "ready" | "deleting";
export type PortState = "creating" | "active" | "releasing";

/**
 * How traffic between this network and the other networks of the host is kept apart:
 * `nftables` — the agent's nftables table drops what is routed between networks unless a network allows
 * the other (`allowed_peers`); `no-forwarding` — no nft on the host, but the host does not route IPv4
 * (net.ipv4.ip_forward = 0), so nothing crosses between bridges; `not-enforced` — the host forwards and
 * no packet filter is available to stop it.
 */
export type Isolation = "nftables" | "no-forwarding" | "not-enforced";

/** What a caller asks for in CreateNetwork, with every default resolved; compared for idempotency. */
export interface NetworkSpec {
  /** Linux bridge name, at most 15 characters. */
  bridge: string;
  /** Normalised CIDR (`a.b.c.d/n` with the host bits zero). */
  cidr: string;
  /** The host's address on the bridge. */
  gateway: string;
  /** 0: untagged. Recorded; not applied without an uplink (see README of the folder). */
  vlanId: number;
  uplink: string;
  masquerade: boolean;
  isolatePorts: boolean;
  /** `networks/{network}` names, sorted. */
  allowedPeers: string[];
  mtu: number;
  labels: Record<string, string>;
}

/** A network as the agent keeps it (`<stateDir>/networks/<id>.json`). */
export interface NetworkRecord extends NetworkSpec {
  id: string;
  /** Whether the agent derived the bridge name (the caller left it empty). */
  bridgeDerived: boolean;
  state: NetworkState;
  isolation: Isolation;
  createTimeMs: number;
}

/** A port as the agent keeps it (inside its network's record file). */
export interface PortRecord {
  /** `{vm}-{nic}`. */
  id: string;
  network: string;
  vm: string;
  nic: string;
  tap: string;
  mac: string;
  ip: string;
  state: PortState;
  createTimeMs: number;
}

// ---- ids and names ------------------------------------------------------------------------------

/** AIP-122 style ids (the rules of VM ids): lower-case letters, digits and hyphens, at most 63. */
const ID = /^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$/;
const ID_RULE =
  "use 1-63 lower-case letters, digits and hyphens, starting with a letter and not ending with a hyphen";

export function checkId(kind: "network" | "vm" | "nic" | "port", id: string, field: string): void {
  if (!ID.test(id)) {
    throw invalidArgument(
      field,
      `"${id.slice(0, 80)}" is not a valid ${kind} id: ${ID_RULE}`,
      `INVALID_${kind.toUpperCase()}_ID`,
    );
  }
}

/** `networks/{id}` (or a bare id, for the port interface) → id. */
export function networkIdFromName(name: string, field = "name", bareOk = false): string {
  let id = name;
  if (name.startsWith("networks/")) id = name.slice("networks/".length);
  else if (!bareOk)
    throw invalidArgument(
      field,
      `"${name.slice(0, 80)}" is not a network name (networks/{network})`,
      "INVALID_NETWORK_NAME",
    );
  checkId("network", id, field);
  return id;
}

/** `vms/{id}` or a bare id → id. */
export function vmIdOf(vm: string, field = "vm"): string {
  const id = vm.startsWith("vms/") ? vm.slice(4) : vm;
  checkId("vm", id, field);
  return id;
}

/** `networks/{n}/ports/{p}` → [n, p]. */
export function portFromName(name: string, field = "name"): [string, string] {
  const m = /^networks\/([^/]+)\/ports\/([^/]+)$/.exec(name);
  if (!m?.[1] || !m[2])
    throw invalidArgument(
      field,
      `"${name.slice(0, 80)}" is not a port name (networks/{network}/ports/{port})`,
      "INVALID_PORT_NAME",
    );
  checkId("network", m[1], field);
  if (!/^[a-z][a-z0-9-]{0,127}$/.test(m[2]))
    throw invalidArgument(field, `"${m[2].slice(0, 80)}" is not a valid port id`, "INVALID_PORT_ID");
  return [m[1], m[2]];
}

/** The port id of a VM's NIC, `{vm}-{nic}` (the API's rule). */
export const portId = (vm: string, nic: string) => `${vm}-${nic}`;

/** Linux interface names: at most 15 bytes, no `/`, whitespace or `:`; we also refuse shell characters. */
const IFNAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$/;

export function checkIfname(name: string, field: string): void {
  if (!IFNAME.test(name))
    throw invalidArgument(
      field,
      `"${name.slice(0, 80)}" is not a usable interface name: 1-15 letters, digits, "_", "." and "-", starting with a letter or digit`,
      "INVALID_INTERFACE_NAME",
    );
}

/** Prefixes of the links this agent derives names for: bridges `vme-…`, taps `vmt-…`. */
export const BRIDGE_PREFIX = "vme-";
export const TAP_PREFIX = "vmt-";

// ---- IPv4 and CIDR arithmetic (shared with the coordinator: @vmenv/rpc/ipv4) ------------------

/**
 * A network's CIDR: IPv4, host bits zero, a prefix of 8 to 30 (a /31 or /32 has no room for a gateway
 * and a guest; wider than /8 is surely a mistake).
 */
export function checkCidr(s: string, field: string): Cidr {
  if (!s) throw invalidArgument(field, "is required (an IPv4 subnet such as 10.20.0.0/24)", "INVALID_CIDR");
  const m = /^([0-9.]+)\/([0-9]{1,2})$/.exec(s);
  const ip = m?.[1] ? parseIp(m[1]) : undefined;
  const prefix = m?.[2] ? Number(m[2]) : Number.NaN;
  if (ip === undefined || !(prefix >= 0 && prefix <= 32))
    throw invalidArgument(
      field,
      `"${s.slice(0, 80)}" is not an IPv4 CIDR such as 10.20.0.0/24`,
      "INVALID_CIDR",
    );
  if (prefix > 30 || prefix < 8)
    throw invalidArgument(
      field,
      `a /${prefix} is not usable: the prefix must be 8 to 30 (room for a gateway and at least one guest)`,
      "INVALID_CIDR",
    );
  const c = parseCidr(s);
  if (!c) {
    const size = 2 ** (32 - prefix);
    throw invalidArgument(
      field,
      `"${s}" has host bits set; did you mean ${formatIp(ip - (ip % size))}/${prefix}?`,
      "INVALID_CIDR",
    );
  }
  return c;
}

export const overlaps = (a: Cidr, b: Cidr) => a.base < b.base + b.size && b.base < a.base + a.size;

/** The network containing `ip/prefix` (for a host's interface address). */
export function cidrOf(ip: number, prefix: number): Cidr {
  const size = 2 ** (32 - prefix);
  return { base: ip - (ip % size), prefix, size };
}

/** The default gateway of a subnet: its first host address. */
export const defaultGateway = (c: Cidr) => formatIp(c.base + 1);

// ---- MAC addresses ------------------------------------------------------------------------------

const MAC = /^([0-9a-f]{2}:){5}[0-9a-f]{2}$/;

/** A MAC a NIC may have: six colon-separated hex bytes, unicast. Returns it in lower case. */
export function checkMac(s: string, field: string): string {
  const m = s.toLowerCase();
  if (!MAC.test(m))
    throw invalidArgument(
      field,
      `"${s.slice(0, 40)}" is not a MAC address such as 52:54:00:12:34:56`,
      "INVALID_MAC_ADDRESS",
    );
  if (Number.parseInt(m.slice(0, 2), 16) & 1)
    throw invalidArgument(field, `${s} is a multicast address`, "INVALID_MAC_ADDRESS");
  return m;
}

/**
 * The MAC of a NIC from the first three bytes of a hash of `vm/nic`: `52:54:00:xx:xx:xx` (0x52 has the
 * locally-administered bit set and the multicast bit clear; 52:54:00 is what QEMU and libvirt use).
 */
export function macFromHash(hash: Uint8Array): string {
  const b = [0x52, 0x54, 0x00, hash[0] ?? 0, hash[1] ?? 0, hash[2] ?? 0];
  return b.map((x) => x.toString(16).padStart(2, "0")).join(":");
}

/** A name of `prefix` plus the first `15 - prefix.length` hex digits of a hash. */
export function ifnameFromHash(prefix: string, hashHex: string): string {
  return prefix + hashHex.slice(0, 15 - prefix.length);
}

// ---- specs and errors ---------------------------------------------------------------------------

/** Whether two specs ask for the same network. */
export function sameNetworkSpec(a: NetworkSpec, b: NetworkSpec): boolean {
  return canonical(a) === canonical(b);
}

export function specOf(r: NetworkRecord): NetworkSpec {
  return {
    bridge: r.bridge,
    cidr: r.cidr,
    gateway: r.gateway,
    vlanId: r.vlanId,
    uplink: r.uplink,
    masquerade: r.masquerade,
    isolatePorts: r.isolatePorts,
    allowedPeers: r.allowedPeers,
    mtu: r.mtu,
    labels: r.labels,
  };
}

function canonical(v: unknown): string {
  return JSON.stringify(v, (_k, x) => {
    if (x && typeof x === "object" && !Array.isArray(x))
      return Object.fromEntries(Object.entries(x).sort(([a], [b]) => a.localeCompare(b)));
    return x;
  });
}

/** FAILED_PRECONDITION: `cidr` overlaps `other` (a network of this agent, or an address of the host). */
export function cidrOverlap(
  network: string,
  cidr: string,
  other: { network?: string; iface?: string; cidr: string },
) {
  const what = other.network
    ? `networks/${other.network}`
    : `the address ${other.cidr} of host interface ${other.iface}`;
  return failedPrecondition(
    `networks/${network}: ${cidr} overlaps ${other.network ? `${what} (${other.cidr})` : what}`,
    "CIDR_OVERLAP",
    {
      network: `networks/${network}`,
      cidr,
      ...(other.network ? { other_network: `networks/${other.network}` } : {}),
      ...(other.iface ? { interface: other.iface } : {}),
      other_cidr: other.cidr,
    },
  );
}

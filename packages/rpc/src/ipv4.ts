/**
 * IPv4 and CIDR arithmetic, and the choice of an address for a NIC, shared by the agent (ports on its
 * networks) and the coordinator (NICs on networks shared by several agents, ADR 20), so that both
 * refuse the same addresses with the same reasons. Plain TypeScript, no I/O.
 */
import { failedPrecondition, invalidArgument, VmenvError } from "./errors.js";

const OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
const IPV4 = new RegExp(`^${OCTET}\\.${OCTET}\\.${OCTET}\\.${OCTET}$`);

/** Dotted quad → unsigned 32-bit integer; undefined when it is not one. */
export function parseIp(s: string): number | undefined {
  if (!IPV4.test(s)) return undefined;
  return s.split(".").reduce((a, o) => a * 256 + Number(o), 0);
}

export function formatIp(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join(".");
}

export interface Cidr {
  /** Network address as an unsigned integer. */
  base: number;
  prefix: number;
  /** Number of addresses (2^(32-prefix)). */
  size: number;
}

export const cidrText = (c: Cidr) => `${formatIp(c.base)}/${c.prefix}`;

/** Parses `a.b.c.d/n`; undefined when it is not one. Host bits must be zero. */
export function parseCidr(s: string): Cidr | undefined {
  const m = /^([0-9.]+)\/([0-9]{1,2})$/.exec(s);
  if (!m?.[1] || !m[2]) return undefined;
  const ip = parseIp(m[1]);
  const prefix = Number(m[2]);
  if (ip === undefined || prefix > 32) return undefined;
  const size = 2 ** (32 - prefix);
  if (ip % size !== 0) return undefined;
  return { base: ip, prefix, size };
}

export const contains = (c: Cidr, ip: number) => ip >= c.base && ip < c.base + c.size;

/** A usable host address of `c`: inside it, not its network or broadcast address. */
export function checkHostAddress(c: Cidr, s: string, field: string): number {
  const ip = parseIp(s);
  if (ip === undefined)
    throw invalidArgument(field, `"${s.slice(0, 80)}" is not an IPv4 address`, "INVALID_IP_ADDRESS");
  if (!contains(c, ip))
    throw invalidArgument(field, `${s} is outside ${cidrText(c)}`, "IP_ADDRESS_OUTSIDE_CIDR");
  if (ip === c.base || ip === c.base + c.size - 1)
    throw invalidArgument(
      field,
      `${s} is the network or broadcast address of ${cidrText(c)}`,
      "INVALID_IP_ADDRESS",
    );
  return ip;
}

/** Who holds an address: named in IP_ADDRESS_IN_USE's message (`text`) and metadata. */
export interface AddressHolder {
  text: string;
  metadata: Record<string, string>;
}

/**
 * An address for a new NIC: `want` when given (a usable host address of the subnet, not the gateway and
 * not taken), else the lowest free host address. RESOURCE_EXHAUSTED (NETWORK_FULL) when the subnet is
 * full; FAILED_PRECONDITION (IP_ADDRESS_IN_USE) when `want` is taken, naming its holder: a port name
 * (string, metadata `port`) or an AddressHolder.
 */
export function allocateIp(
  c: Cidr,
  gateway: string,
  used: ReadonlyMap<string, string | AddressHolder>,
  want: string | undefined,
  network: string,
  field = "ip_address",
): string {
  if (want) {
    checkHostAddress(c, want, field);
    if (want === gateway)
      throw invalidArgument(field, `${want} is the gateway of networks/${network}`, "IP_ADDRESS_IS_GATEWAY");
    const held = used.get(want);
    if (held) {
      const holder = typeof held === "string" ? { text: held, metadata: { port: held } } : held;
      throw failedPrecondition(
        `${want} on networks/${network} is already used by ${holder.text}`,
        "IP_ADDRESS_IN_USE",
        { network: `networks/${network}`, ...holder.metadata, ip_address: want },
      );
    }
    return want;
  }
  for (let ip = c.base + 1; ip < c.base + c.size - 1; ip++) {
    const s = formatIp(ip);
    if (s !== gateway && !used.has(s)) return s;
  }
  throw new VmenvError(
    "resource-exhausted",
    `networks/${network} (${cidrText(c)}) has no free address left`,
    {
      reason: "NETWORK_FULL",
      metadata: { network: `networks/${network}` },
    },
  );
}

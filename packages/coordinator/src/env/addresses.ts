/**
 * Addresses of members' NICs on shared networks, allocated by the coordinator for the whole fleet
 * (docs/adr/0020-addresses-on-shared-networks.md).
 *
 * A network that an agent reports with an `uplink` joins a layer-2 segment shared with every other agent
 * that reports a network of the same name with an uplink: one segment per name, one address space, so
 * those agents must agree on its CIDR and gateway (NETWORK_MISMATCH otherwise). The addresses in use are
 * held in the store, `addr/{network}/{address}` → environment, member and NIC, written in the
 * transaction that adds the member to its environment's record and deleted in the one that removes it.
 *
 * A NIC on a shared network gets the lowest free address of the CIDR (never the network, broadcast or
 * gateway address, nor one another NIC holds) unless it names one, which must then be free. Either way
 * the address is written into the member's spec: CreateVm, and every retry, resume, migration or
 * recreation after it, hands the agent that address. NICs on local networks (no uplink) are left to
 * their agent, as before.
 */
import { failedPrecondition } from "@vmenv/rpc/errors";
import { type AddressHolder, allocateIp, type Cidr, parseCidr } from "@vmenv/rpc/ipv4";
import type { AgentView } from "../fleet/fleet.js";
import { keys } from "../store/keys.js";
import type { JsonValue, StoreReader, Txn } from "../store/store.js";
import type { MemberRecord } from "./model.js";

/** What `addr/{network}/{address}` holds: the NIC that has the address. */
export interface AddressHolding {
  [k: string]: JsonValue | undefined;
  env: string;
  member: string;
  nic: string;
}

/** A NIC of a member's spec (protobuf JSON of VmNic). */
export interface NicJson {
  [k: string]: JsonValue | undefined;
  id?: string;
  /** `networks/{network}`. */
  network?: string;
  macAddress?: string;
  ipAddress?: string;
}

/** A shared network as the agents that report it agree on it. */
export interface Segment {
  /** Bare network id ("lan"). */
  network: string;
  cidr: Cidr;
  gateway: string;
}

type Views = ReadonlyArray<Pick<AgentView, "id" | "networkDetails">>;

/** The NICs of a member's spec. */
export function nicsOf(m: Pick<MemberRecord, "spec">): NicJson[] {
  return ((m.spec as { nics?: NicJson[] } | null)?.nics ?? []) as NicJson[];
}

const bare = (network: string) => network.replace(/^networks\//, "");

/**
 * The segment that `network` (`networks/{network}`) joins on agent `agent`; undefined when the network is
 * local there (no uplink) or not known. FAILED_PRECONDITION (NETWORK_MISMATCH, naming both agents) when
 * another agent reports a shared network of that name with another CIDR or gateway.
 */
export function segmentOf(views: Views, agent: string, network: string): Segment | undefined {
  const shared = (v: Views[number]) => v.networkDetails?.find((n) => n.name === network && n.uplink);
  const own = views.find((v) => v.id === agent);
  const mine = own && shared(own);
  if (!mine) return undefined;
  for (const v of views) {
    const other = v.id === agent ? undefined : shared(v);
    if (other && (other.cidr !== mine.cidr || other.gateway !== mine.gateway))
      throw failedPrecondition(
        `${network} is shared (uplinked) on agents/${agent} as ${mine.cidr} with gateway ${mine.gateway} and on agents/${v.id} as ${other.cidr} with gateway ${other.gateway}: agents sharing a network by name must give it the same cidr and gateway`,
        "NETWORK_MISMATCH",
        { network, agent: `agents/${agent}`, other_agent: `agents/${v.id}` },
      );
  }
  // An agent checks its CIDRs; one that cannot be read is left to it.
  const cidr = parseCidr(mine.cidr);
  return cidr ? { network: bare(network), cidr, gateway: mine.gateway } : undefined;
}

const holderOf = (h: AddressHolding): AddressHolder => ({
  text: `member ${h.member} (NIC ${h.nic}) of environments/${h.env}`,
  metadata: { environment: `environments/${h.env}`, member: h.member, nic: h.nic },
});

/** The addresses held on `network` (bare id), each with its holding. */
export async function holdings(r: StoreReader, network: string): Promise<Map<string, AddressHolding>> {
  const prefix = keys.addressPrefix(network);
  const rows = await r.list<AddressHolding>(prefix);
  return new Map(rows.map(([k, h]) => [k.slice(prefix.length), h]));
}

/**
 * Gives every NIC of `members` (of environment `env`, placed: `agent` set) that joins a shared network on
 * its agent an address held in `tx`: its own `ip_address` when it names one (refused when another NIC
 * holds it: FAILED_PRECONDITION IP_ADDRESS_IN_USE naming the holder; outside the CIDR, the network's own
 * addresses or the gateway: INVALID_ARGUMENT), else the lowest free one (RESOURCE_EXHAUSTED
 * NETWORK_FULL when none is). Named addresses are taken first, so that no member is handed one that
 * another member of the same batch names. Returns the members with those addresses in their specs.
 * `field` names a NIC's address in errors.
 */
export async function assignAddresses(
  tx: Txn,
  views: Views,
  env: string,
  members: MemberRecord[],
  field: (member: string, nic: number) => string = (m, j) => `members[${m}].spec.nics[${j}].ip_address`,
): Promise<MemberRecord[]> {
  const specs = members.map((m) => nicsOf(m).map((n) => ({ ...n })));
  const slots = members.flatMap((m, i) =>
    (specs[i] ?? []).flatMap((nic, j) => {
      const seg = nic.network ? segmentOf(views, m.agent, nic.network) : undefined;
      return seg ? [{ m, nic, j, seg }] : [];
    }),
  );
  const named = slots.filter((s) => s.nic.ipAddress);
  for (const { m, nic, j, seg } of [...named, ...slots.filter((s) => !s.nic.ipAddress)]) {
    const used = new Map<string, AddressHolder>();
    for (const [ip, h] of await holdings(tx, seg.network))
      if (h.env !== env || h.member !== m.id || h.nic !== nic.id) used.set(ip, holderOf(h));
    const ip = allocateIp(
      seg.cidr,
      seg.gateway,
      used,
      nic.ipAddress || undefined,
      seg.network,
      field(m.id, j),
    );
    const h: AddressHolding = { env, member: m.id, nic: nic.id ?? "" };
    tx.put(keys.address(seg.network, ip), h);
    nic.ipAddress = ip;
  }
  const touched = new Set(slots.map((s) => s.m.id));
  return members.map((m, i) =>
    touched.has(m.id)
      ? { ...m, spec: { ...(m.spec as Record<string, JsonValue>), nics: specs[i] ?? [] } }
      : m,
  );
}

/** Deletes in `tx` the addresses that member `m` of environment `env` holds on the networks of its NICs. */
export async function releaseAddresses(tx: Txn, env: string, m: Pick<MemberRecord, "id" | "spec">) {
  const networks = new Set(nicsOf(m).map((n) => bare(n.network ?? "")));
  for (const network of networks) {
    if (!network) continue;
    for (const [ip, h] of await holdings(tx, network))
      if (h.env === env && h.member === m.id) tx.del(keys.address(network, ip));
  }
}

import {
  alreadyExists,
  failedPrecondition,
  invalidArgument,
  notFound,
  unimplemented,
  type VmenvError,
} from "@vmenv/rpc/errors";
import type { Logger } from "pino";
import {
  allocateIp,
  BRIDGE_PREFIX,
  type Cidr,
  checkCidr,
  checkHostAddress,
  checkId,
  checkIfname,
  checkMac,
  cidrOf,
  cidrOverlap,
  cidrText,
  defaultGateway,
  type NetworkRecord,
  type NetworkSpec,
  networkIdFromName,
  overlaps,
  type PortRecord,
  parseCidr,
  parseIp,
  portId,
  sameNetworkSpec,
  specOf,
  TAP_PREFIX,
  vmIdOf,
} from "./domain.js";
import { IpLinkHost, type LinkHost, type LinkInfo } from "./ip.js";
import { agentTagFor, bridgeNameFor, macFor, tapNameFor } from "./names.js";
import { type NetworkFilter, NftFilter } from "./nft.js";
import type { NicAttachment, NicBackend } from "./ports.js";
import { type NetworkDoc, NetworkRecords } from "./records.js";

export interface NetworkManagerDeps {
  /** The agent's state directory: records under `networks/`. */
  stateDir: string;
  logger: Logger;
  /** The host adapter; default: iproute2 from PATH. */
  host?: LinkHost;
  /** The packet filter that isolates networks; default: nftables (`nft` from PATH), when installed. */
  filter?: NetworkFilter;
  now?: () => number;
}

/** What a caller may ask for in CreateNetwork (empty strings and zeros: the defaults). */
export interface NetworkRequest {
  bridge: string;
  cidr: string;
  gateway: string;
  vlanId: number;
  uplink: string;
  masquerade: boolean;
  isolatePorts: boolean;
  allowedPeers: string[];
  mtu: number;
  labels: Record<string, string>;
}

export interface NetworkView {
  kind: "network";
  record: NetworkRecord;
  portCount: number;
}

export interface PortView {
  kind: "port";
  record: PortRecord;
  /** The tap exists and is on the network's bridge (measured when asked). */
  active: boolean;
}

const DEFAULT_MTU = 1500;

/**
 * The networks of this agent: a Linux bridge per network and a tap per VM NIC, recorded under
 * `<stateDir>/networks/`. Every step measures the host first, then acts, then verifies. A record is
 * written (state `creating`) before its link is made, and every link carries the alias
 * `vmenv:<agent tag>:<resource>`, so that after a crash what was half made is provably ours and removed,
 * and a link of the same name that is not ours is never touched.
 */
export class NetworkManager implements NicBackend {
  readonly #docs = new Map<string, NetworkDoc>();
  readonly #records: NetworkRecords;
  readonly #host: LinkHost;
  readonly #filter: NetworkFilter;
  readonly #now: () => number;
  readonly #tag: string;
  /** Mutations run one at a time (they are short: a few `ip` calls each). */
  #queue: Promise<unknown> = Promise.resolve();

  constructor(private readonly d: NetworkManagerDeps) {
    this.#records = new NetworkRecords(d.stateDir);
    this.#host = d.host ?? new IpLinkHost();
    this.#now = d.now ?? Date.now;
    this.#tag = agentTagFor(d.stateDir);
    this.#filter = d.filter ?? new NftFilter(this.#tag);
  }

  /** Makes the isolation rules match the ready networks (the table goes with the last network). */
  async #syncFilter(): Promise<void> {
    const ready = [...this.#docs.values()].map((d) => d.network).filter((n) => n.state === "ready");
    const bridgeOf = (name: string) => this.#docs.get(name.slice("networks/".length))?.network.bridge;
    await this.#filter.sync(
      ready.map((n) => ({
        bridge: n.bridge,
        allowedBridges: n.allowedPeers.map(bridgeOf).filter((b): b is string => b !== undefined),
      })),
    );
  }

  #serial<T>(f: () => Promise<T>): Promise<T> {
    const next = this.#queue.then(f, f);
    this.#queue = next.catch(() => undefined);
    return next;
  }

  #bridgeAlias = (id: string) => `vmenv:${this.#tag}:networks/${id}`;
  #tapAlias = (network: string, port: string) => `vmenv:${this.#tag}:networks/${network}/ports/${port}`;
  /** Whether a link carries this agent's mark (any resource of it). */
  #marked = (l: LinkInfo) => l.ifalias?.startsWith(`vmenv:${this.#tag}:`) === true;

  // ---- start -----------------------------------------------------------------------------------

  /**
   * Loads the records and makes the host match them: a network or port still `creating` (a crash in
   * the middle of a create) is removed with its link, one `deleting`/`releasing` is finished, a ready
   * network's bridge and an active port's tap are re-created when missing. Links named `vme-…`/`vmt-…`
   * that carry this agent's mark but no record are removed; unmarked ones are left alone (another agent's).
   */
  async init(): Promise<void> {
    return this.#serial(async () => {
      for (const doc of await this.#records.load()) {
        const n = doc.network;
        const log = { network: `networks/${n.id}`, bridge: n.bridge };
        if (n.state === "creating" || n.state === "deleting") {
          for (const p of doc.ports) await this.#removeOurLink(p.tap, this.#tapAlias(n.id, p.id));
          await this.#removeOurLink(n.bridge, this.#bridgeAlias(n.id), true);
          await this.#records.remove(n.id);
          this.d.logger.info(
            log,
            n.state === "creating" ? "removed a half-created network" : "finished a delete",
          );
          continue;
        }
        this.#docs.set(n.id, doc);
        try {
          await this.#ensureBridge(n);
        } catch (err) {
          this.d.logger.error({ ...log, err }, "could not restore the bridge of a network");
          continue;
        }
        // The guests on this host keep their bridge even when the uplink is gone.
        if (n.uplink)
          await this.#ensureUplink(n).catch((err: unknown) =>
            this.d.logger.error({ ...log, uplink: n.uplink, err }, "could not join the uplink to the bridge"),
          );
        for (const p of [...doc.ports]) {
          if (p.state === "creating" || p.state === "releasing") {
            await this.#removeOurLink(p.tap, this.#tapAlias(n.id, p.id), p.state === "creating");
            doc.ports = doc.ports.filter((x) => x !== p);
            this.d.logger.info({ ...log, port: p.id }, "removed a half-made port");
            continue;
          }
          await this.#ensureTap(n, p).catch((err: unknown) =>
            this.d.logger.error({ ...log, port: p.id, err }, "could not restore the tap of a port"),
          );
        }
        await this.#records.save(doc);
      }
      // Links of ours that no record knows (a record removed by hand, or one lost in a crash).
      const known = new Set<string>();
      for (const doc of this.#docs.values()) {
        known.add(doc.network.bridge);
        for (const p of doc.ports) known.add(p.tap);
      }
      const stray = (await this.#host.links()).filter(
        (l) =>
          (l.ifname.startsWith(BRIDGE_PREFIX) || l.ifname.startsWith(TAP_PREFIX)) &&
          this.#marked(l) &&
          !known.has(l.ifname),
      );
      // Taps first, so that a bridge is removed empty.
      stray.sort(
        (a, b) => (a.ifname.startsWith(TAP_PREFIX) ? -1 : 0) - (b.ifname.startsWith(TAP_PREFIX) ? -1 : 0),
      );
      for (const l of stray) {
        await this.#host.remove(l.ifname);
        this.d.logger.warn(
          { link: l.ifname, alias: l.ifalias },
          "removed a link of this agent that no record knows",
        );
      }
      // The isolation rules again, for exactly the networks found (none: the table goes).
      await this.#syncFilter().catch((err: unknown) =>
        this.d.logger.error({ err }, "could not write the isolation rules (nftables)"),
      );
    });
  }

  /**
   * Removes `name` if it is provably ours: it carries `alias`, or (`creating`: our record said we were
   * making it) it carries no alias yet and is of the expected kind.
   */
  async #removeOurLink(name: string, alias: string, creating = false): Promise<void> {
    const l = await this.#host.link(name);
    if (!l) return;
    if (
      l.ifalias === alias ||
      (creating && l.ifalias === undefined && (l.kind === "bridge" || l.kind === "tun"))
    ) {
      await this.#host.remove(name);
      return;
    }
    this.d.logger.warn({ link: name, alias: l.ifalias }, "left a link alone: it is not provably ours");
  }

  // ---- host steps (measure, act, verify) -------------------------------------------------------

  #notOurs(name: string, l: LinkInfo, what: "bridge" | "tap", resource: string): VmenvError {
    return failedPrecondition(
      `cannot use ${what} ${name} for ${resource}: a link of that name exists on the host and is not this agent's${l.ifalias ? ` (alias "${l.ifalias.slice(0, 80)}")` : ""}`,
      what === "bridge" ? "BRIDGE_NAME_TAKEN" : "TAP_NAME_TAKEN",
      { [what]: name, resource },
    );
  }

  async #ensureBridge(n: NetworkRecord): Promise<void> {
    const alias = this.#bridgeAlias(n.id);
    let l = await this.#host.link(n.bridge);
    if (l && !(l.ifalias === alias && l.kind === "bridge")) {
      // A bridge we were in the middle of creating has no alias yet.
      if (!(n.state === "creating" && l.ifalias === undefined && l.kind === "bridge"))
        throw this.#notOurs(n.bridge, l, "bridge", `networks/${n.id}`);
    }
    if (!l) await this.#host.addBridge(n.bridge);
    if (l?.ifalias !== alias) await this.#host.setAlias(n.bridge, alias);
    if (l?.mtu !== n.mtu) await this.#host.setMtu(n.bridge, n.mtu);
    if (!l?.flags.includes("UP")) await this.#host.setUp(n.bridge);
    // With an uplink the gateway is the segment's router, not this host (see ADR 0019).
    const prefix = Number(n.cidr.split("/")[1]);
    const addrs = n.uplink ? [] : await this.#host.addresses(n.bridge);
    if (!n.uplink && !addrs.some((a) => a.local === n.gateway && a.prefixlen === prefix))
      await this.#host.addAddress(n.bridge, n.gateway, prefix);
    l = await this.#host.link(n.bridge);
    const after = n.uplink ? [] : await this.#host.addresses(n.bridge);
    if (
      l?.kind !== "bridge" ||
      l.ifalias !== alias ||
      !l.flags.includes("UP") ||
      (!n.uplink && !after.some((a) => a.local === n.gateway))
    )
      throw new Error(`bridge ${n.bridge} of networks/${n.id} is not as it should be after setting it up`);
  }

  /** Why `uplink` cannot join networks/`id`, or undefined when it can (measured on the host). */
  async #uplinkRefusal(id: string, uplink: string, bridge: string): Promise<VmenvError | undefined> {
    const meta = { uplink, network: `networks/${id}` };
    for (const d of this.#docs.values())
      if (d.network.uplink === uplink && d.network.id !== id)
        return failedPrecondition(
          `uplink ${uplink} already joins networks/${d.network.id} to its segment; an interface can be the uplink of one network`,
          "UPLINK_IN_USE",
          { ...meta, other_network: `networks/${d.network.id}` },
        );
    const l = await this.#host.link(uplink);
    if (!l)
      return failedPrecondition(
        `uplink ${uplink} is not an interface of this host`,
        "UPLINK_NOT_FOUND",
        meta,
      );
    if (l.master !== undefined && l.master !== bridge)
      return failedPrecondition(`uplink ${uplink} is already a port of ${l.master}`, "UPLINK_IN_USE", {
        ...meta,
        master: l.master,
      });
    const why =
      l.kind === "bridge"
        ? "it is a bridge (give one of its ports, or an Ethernet, veth, bond or VLAN interface)"
        : l.flags.includes("LOOPBACK")
          ? "it is the loopback interface"
          : (await this.#host.addresses(uplink)).length > 0
            ? "it has IPv4 addresses, which would stop working once it is a bridge port (move them off first)"
            : undefined;
    return why
      ? failedPrecondition(`uplink ${uplink} cannot join a bridge: ${why}`, "UPLINK_UNUSABLE", meta)
      : undefined;
  }

  /** Makes the uplink a port of the network's bridge, up. */
  async #ensureUplink(n: NetworkRecord): Promise<void> {
    const refusal = await this.#uplinkRefusal(n.id, n.uplink, n.bridge);
    if (refusal) throw refusal;
    let l = await this.#host.link(n.uplink);
    if (l?.master !== n.bridge) await this.#host.setMaster(n.uplink, n.bridge);
    if (!l?.flags.includes("UP")) await this.#host.setUp(n.uplink);
    l = await this.#host.link(n.uplink);
    if (l?.master !== n.bridge || !l.flags.includes("UP"))
      throw new Error(`uplink ${n.uplink} of networks/${n.id} is not on ${n.bridge} after joining it`);
  }

  async #ensureTap(n: NetworkRecord, p: PortRecord): Promise<void> {
    const alias = this.#tapAlias(n.id, p.id);
    let l = await this.#host.link(p.tap);
    if (l && !(l.ifalias === alias && l.kind === "tun")) {
      if (!(p.state === "creating" && l.ifalias === undefined && l.kind === "tun"))
        throw this.#notOurs(p.tap, l, "tap", `networks/${n.id}/ports/${p.id}`);
    }
    if (!l) await this.#host.addTap(p.tap);
    if (l?.ifalias !== alias) await this.#host.setAlias(p.tap, alias);
    if (l?.mtu !== n.mtu) await this.#host.setMtu(p.tap, n.mtu);
    if (l?.master !== n.bridge) await this.#host.setMaster(p.tap, n.bridge);
    if (!l?.flags.includes("UP")) await this.#host.setUp(p.tap);
    if ((l?.isolated ?? false) !== n.isolatePorts) await this.#host.setIsolated(p.tap, n.isolatePorts);
    l = await this.#host.link(p.tap);
    if (!l || l.master !== n.bridge || l.ifalias !== alias || !l.flags.includes("UP"))
      throw new Error(
        `tap ${p.tap} of networks/${n.id}/ports/${p.id} is not as it should be after setting it up`,
      );
  }

  // ---- networks --------------------------------------------------------------------------------

  /** Checks a request and resolves its defaults (no host access). */
  #spec(id: string, want: NetworkRequest): { spec: NetworkSpec; cidr: Cidr; derived: boolean } {
    checkId("network", id, "network_id");
    const cidr = checkCidr(want.cidr, "network.cidr");
    const derived = !want.bridge;
    const bridge = want.bridge || bridgeNameFor(id);
    checkIfname(bridge, "network.bridge_name");
    const gateway = want.gateway || defaultGateway(cidr);
    checkHostAddress(cidr, gateway, "network.gateway");
    if (!Number.isInteger(want.vlanId) || want.vlanId < 0 || want.vlanId > 4094)
      throw invalidArgument("network.vlan_id", `${want.vlanId} is not a VLAN id (1 to 4094, or 0 for none)`);
    if (want.uplink) {
      checkIfname(want.uplink, "network.uplink");
      if (want.uplink.startsWith(BRIDGE_PREFIX) || want.uplink.startsWith(TAP_PREFIX))
        throw invalidArgument(
          "network.uplink",
          `${want.uplink} is a bridge or tap of vmenv; the uplink is a host interface (Ethernet, veth, bond or VLAN interface)`,
        );
      if (want.vlanId)
        throw unimplemented(
          "network.vlan_id",
          `tagging on the uplink is not built yet; give a VLAN interface the host already has (e.g. ${want.uplink}.${want.vlanId}) as the uplink instead`,
        );
    } else if (want.vlanId)
      throw invalidArgument(
        "network.vlan_id",
        "a VLAN id tags traffic on the uplink: set network.uplink too",
      );
    if (want.masquerade)
      throw unimplemented("network.masquerade", "source-NAT to the host's address is not built yet");
    const mtu = want.mtu || DEFAULT_MTU;
    if (!Number.isInteger(mtu) || mtu < 68 || mtu > 65535)
      throw invalidArgument("network.mtu", `${want.mtu} is not an MTU (68 to 65535)`);
    const allowedPeers = [
      ...new Set(want.allowedPeers.map((p) => `networks/${networkIdFromName(p, "network.allowed_peers")}`)),
    ].sort();
    return {
      spec: {
        bridge,
        cidr: cidrText(cidr),
        gateway,
        vlanId: want.vlanId,
        uplink: want.uplink,
        masquerade: want.masquerade,
        isolatePorts: want.isolatePorts,
        allowedPeers,
        mtu,
        labels: { ...want.labels },
      },
      cidr,
      derived,
    };
  }

  /**
   * Creates a network and its bridge. The same id and the same network again: the network as it is
   * (its bridge re-made if it went missing). Another network under the same id: ALREADY_EXISTS. A CIDR
   * that overlaps another network or an address of the host, or a bridge name that is taken by a link
   * that is not ours: FAILED_PRECONDITION naming it. A failure leaves nothing on the host.
   */
  async createNetwork(id: string, want: NetworkRequest): Promise<NetworkView> {
    const { spec, cidr, derived } = this.#spec(id, want);
    return this.#serial(async () => {
      const have = this.#docs.get(id);
      if (have) {
        const asked = derived ? { ...spec, bridge: have.network.bridge } : spec;
        if (!sameNetworkSpec(specOf(have.network), asked)) throw alreadyExists("network", `networks/${id}`);
        await this.#ensureBridge(have.network);
        if (have.network.uplink) await this.#ensureUplink(have.network);
        return this.#view(have);
      }
      for (const doc of this.#docs.values()) {
        const other = parseCidr(doc.network.cidr);
        if (other && overlaps(cidr, other))
          throw cidrOverlap(id, spec.cidr, { network: doc.network.id, cidr: doc.network.cidr });
        if (doc.network.bridge === spec.bridge)
          throw failedPrecondition(
            `bridge ${spec.bridge} is already the bridge of networks/${doc.network.id}`,
            "BRIDGE_NAME_TAKEN",
            { bridge: spec.bridge, other_network: `networks/${doc.network.id}` },
          );
      }
      for (const a of await this.#host.addresses()) {
        const ip = parseIp(a.local);
        if (ip === undefined) continue;
        const theirs = cidrOf(ip, a.prefixlen);
        if (overlaps(cidr, theirs))
          throw cidrOverlap(id, spec.cidr, { iface: a.ifname, cidr: `${a.local}/${a.prefixlen}` });
      }
      const existing = await this.#host.link(spec.bridge);
      if (existing) throw this.#notOurs(spec.bridge, existing, "bridge", `networks/${id}`);
      if (spec.uplink) {
        const refusal = await this.#uplinkRefusal(id, spec.uplink, spec.bridge);
        if (refusal) throw refusal;
      }

      const record: NetworkRecord = {
        id,
        ...spec,
        bridgeDerived: derived,
        state: "creating",
        isolation: (await this.#filter.available())
          ? "nftables"
          : (await this.#host.forwarding())
            ? "not-enforced"
            : "no-forwarding",
        createTimeMs: this.#now(),
      };
      const doc: NetworkDoc = { network: record, ports: [] };
      await this.#records.save(doc);
      try {
        await this.#ensureBridge(record);
        if (record.uplink) await this.#ensureUplink(record);
      } catch (err) {
        await this.#removeOurLink(record.bridge, this.#bridgeAlias(id), true).catch(() => undefined);
        await this.#records.remove(id);
        throw err;
      }
      record.state = "ready";
      this.#docs.set(id, doc);
      try {
        await this.#syncFilter();
      } catch (err) {
        // No network without its isolation: undone, nothing left.
        this.#docs.delete(id);
        await this.#removeOurLink(record.bridge, this.#bridgeAlias(id), true).catch(() => undefined);
        await this.#records.remove(id);
        await this.#syncFilter().catch(() => undefined);
        throw err;
      }
      await this.#records.save(doc);
      if (record.isolation === "not-enforced")
        this.d.logger.warn(
          { network: `networks/${id}` },
          "this host forwards IPv4 and has no packet filter (nft/iptables): traffic between networks is not blocked",
        );
      this.d.logger.info(
        { network: `networks/${id}`, bridge: record.bridge, cidr: record.cidr },
        "network created",
      );
      return this.#view(doc);
    });
  }

  #doc(id: string): NetworkDoc {
    const doc = this.#docs.get(id);
    if (!doc) throw notFound("network", `networks/${id}`);
    return doc;
  }

  #view = (doc: NetworkDoc): NetworkView => ({
    kind: "network",
    record: doc.network,
    portCount: doc.ports.length,
  });

  async getNetwork(id: string): Promise<NetworkView> {
    return this.#view(this.#doc(id));
  }

  /** All networks, in id order. */
  async listNetworks(): Promise<NetworkView[]> {
    return [...this.#docs.values()].sort((a, b) => (a.network.id < b.network.id ? -1 : 1)).map(this.#view);
  }

  /** Removes a network and its bridge. FAILED_PRECONDITION naming a port while it has ports. */
  async deleteNetwork(id: string, opts: { allowMissing?: boolean } = {}): Promise<void> {
    checkId("network", id, "name");
    return this.#serial(async () => {
      const doc = this.#docs.get(id);
      if (!doc) {
        if (opts.allowMissing) return;
        throw notFound("network", `networks/${id}`);
      }
      const first = doc.ports[0];
      if (first)
        throw failedPrecondition(
          `cannot delete networks/${id}: networks/${id}/ports/${first.id} (vms/${first.vm}) is on it${doc.ports.length > 1 ? ` (and ${doc.ports.length - 1} more ports)` : ""}`,
          "NETWORK_IN_USE",
          { network: `networks/${id}`, port: `networks/${id}/ports/${first.id}`, vm: `vms/${first.vm}` },
        );
      doc.network.state = "deleting";
      await this.#records.save(doc);
      await this.#removeOurLink(doc.network.bridge, this.#bridgeAlias(id));
      if (await this.#host.link(doc.network.bridge))
        this.d.logger.warn(
          { network: `networks/${id}`, bridge: doc.network.bridge },
          "the bridge is not ours any more; left it",
        );
      await this.#records.remove(id);
      this.#docs.delete(id);
      await this.#syncFilter();
      this.d.logger.info({ network: `networks/${id}` }, "network deleted");
    });
  }

  // ---- ports -----------------------------------------------------------------------------------

  async #portView(p: PortRecord, links?: Map<string, LinkInfo>): Promise<PortView> {
    const n = this.#docs.get(p.network)?.network;
    const l = links ? links.get(p.tap) : await this.#host.link(p.tap);
    return { kind: "port", record: p, active: p.state === "active" && !!n && l?.master === n.bridge };
  }

  async getPort(network: string, port: string): Promise<PortView> {
    const doc = this.#doc(network);
    const p = doc.ports.find((x) => x.id === port);
    if (!p) throw notFound("port", `networks/${network}/ports/${port}`);
    return this.#portView(p);
  }

  /** The ports of one network (or of all), optionally of one VM, in name order. */
  async listPorts(filter: { network?: string; vm?: string } = {}): Promise<PortView[]> {
    const docs = filter.network ? [this.#doc(filter.network)] : [...this.#docs.values()];
    const ports = docs
      .flatMap((d) => d.ports)
      .filter((p) => !filter.vm || p.vm === filter.vm)
      .sort((a, b) => {
        const ka = `${a.network}/${a.id}`;
        const kb = `${b.network}/${b.id}`;
        return ka < kb ? -1 : ka > kb ? 1 : 0;
      });
    const links = new Map((await this.#host.links()).map((l) => [l.ifname, l]));
    return Promise.all(ports.map((p) => this.#portView(p, links)));
  }

  #attachment(n: NetworkRecord, p: PortRecord): NicAttachment {
    return {
      port: `networks/${n.id}/ports/${p.id}`,
      tap: p.tap,
      mac: p.mac,
      ip: p.ip,
      prefix: Number(n.cidr.split("/")[1]),
      gateway: n.gateway,
      mtu: n.mtu,
    };
  }

  /** NicBackend.allocate: see ports.ts. */
  async allocate(
    network: string,
    vm: string,
    nic: string,
    want: { mac?: string; ip?: string },
  ): Promise<NicAttachment> {
    const netId = networkIdFromName(network, "network", true);
    const vmId = vmIdOf(vm);
    checkId("nic", nic, "nic_id");
    const mac = want.mac ? checkMac(want.mac, "mac_address") : undefined;
    return this.#serial(async () => {
      const doc = this.#doc(netId);
      const n = doc.network;
      if (n.state !== "ready")
        throw failedPrecondition(`networks/${netId} is ${n.state}`, "NETWORK_NOT_READY", {
          network: `networks/${netId}`,
        });
      const id = portId(vmId, nic);
      const name = `networks/${netId}/ports/${id}`;
      const have = doc.ports.find((p) => p.vm === vmId && p.nic === nic);
      if (have) {
        if ((mac && mac !== have.mac) || (want.ip && want.ip !== have.ip))
          throw alreadyExists("port", name, `with MAC ${have.mac} and address ${have.ip}`);
        await this.#ensureTap(n, have);
        return this.#attachment(n, have);
      }
      const clash = doc.ports.find((p) => p.id === id);
      if (clash)
        throw failedPrecondition(
          `port id ${id} is taken by NIC ${clash.nic} of vms/${clash.vm}`,
          "PORT_ID_TAKEN",
          { port: name, vm: `vms/${clash.vm}` },
        );
      const cidr = checkCidr(n.cidr, "network.cidr");
      const used = new Map(doc.ports.map((p) => [p.ip, `networks/${netId}/ports/${p.id}`]));
      const ip = allocateIp(cidr, n.gateway, used, want.ip, netId);
      const theMac = mac ?? macFor(vmId, nic);
      const macHolder = doc.ports.find((p) => p.mac === theMac);
      if (macHolder)
        throw failedPrecondition(
          `MAC ${theMac} is already used on networks/${netId} by port ${macHolder.id}; give the NIC another MAC`,
          "MAC_ADDRESS_IN_USE",
          { port: `networks/${netId}/ports/${macHolder.id}`, mac_address: theMac },
        );
      const tap = tapNameFor(vmId, nic);
      for (const d of this.#docs.values()) {
        const other = d.ports.find((p) => p.tap === tap);
        if (other)
          throw failedPrecondition(
            `tap ${tap} of vms/${vmId} NIC ${nic} is already the port networks/${d.network.id}/ports/${other.id}`,
            "TAP_NAME_TAKEN",
            { tap, port: `networks/${d.network.id}/ports/${other.id}` },
          );
      }
      const existing = await this.#host.link(tap);
      if (existing) throw this.#notOurs(tap, existing, "tap", name);
      const p: PortRecord = {
        id,
        network: netId,
        vm: vmId,
        nic,
        tap,
        mac: theMac,
        ip,
        state: "creating",
        createTimeMs: this.#now(),
      };
      doc.ports.push(p);
      try {
        await this.#records.save(doc);
        await this.#ensureTap(n, p);
      } catch (err) {
        await this.#removeOurLink(tap, this.#tapAlias(netId, id), true).catch(() => undefined);
        doc.ports = doc.ports.filter((x) => x !== p);
        await this.#records.save(doc).catch(() => undefined);
        throw err;
      }
      p.state = "active";
      await this.#records.save(doc);
      this.d.logger.info({ port: name, tap, mac: theMac, ip }, "port created");
      return this.#attachment(n, p);
    });
  }

  /** NicBackend.release: see ports.ts. */
  async release(network: string, vm: string, nic: string): Promise<void> {
    const netId = networkIdFromName(network, "network", true);
    const vmId = vmIdOf(vm);
    checkId("nic", nic, "nic_id");
    return this.#serial(async () => {
      const doc = this.#docs.get(netId);
      const p = doc?.ports.find((x) => x.vm === vmId && x.nic === nic);
      if (!doc || !p) return;
      p.state = "releasing";
      await this.#records.save(doc);
      await this.#removeOurLink(p.tap, this.#tapAlias(netId, p.id));
      doc.ports = doc.ports.filter((x) => x !== p);
      await this.#records.save(doc);
      this.d.logger.info({ port: `networks/${netId}/ports/${p.id}`, tap: p.tap }, "port released");
    });
  }
}

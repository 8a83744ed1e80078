/**
 * The collector (seed 001's container collector). Runs once at start and then every
 * `collectorIntervalMs`:
 *
 * 1. **Expired reservations**: a claim (`claim/{op}.{member}`) past its deadline whose operation is
 *    final or gone is released — its usage given back to the tree and the agent, the claim deleted, and
 *    the member it held room for (never confirmed: it has no VM) dropped from its environment record —
 *    in one transaction. A migration's claim (`migrationFrom`) charged only its destination agent: the
 *    charge goes back to that agent, the member stays where it runs.
 * 2. **VMs (and volumes) nobody owns**: on every agent that is not DOWN, a VM or volume carrying the
 *    coordinator's labels whose environment has no such member on that agent, and whose environment no
 *    operation holds (its lock is free), is deleted.
 * 3. **Addresses on shared networks** (addresses.ts): a holding whose member (or the member's NIC on that
 *    network) no longer exists is dropped; a member's explicit address on a shared network that nothing
 *    holds (one given before the coordinator allocated addresses, ADR 20) is recorded, so it is not
 *    handed out again. Holdings change in the transactions that change members, so neither race an
 *    operation.
 *
 * Every action is logged; counters say how much was done.
 */
import type { Logger } from "@vmenv/rpc";
import { usageFromStore } from "../domain/usage.js";
import { keys } from "../store/keys.js";
import type { JsonValue } from "../store/store.js";
import { type AddressHolding, nicsOf, releaseAddresses, segmentOf } from "./addresses.js";
import { deleteVm, deleteVolume } from "./agent.js";
import { type EnvRecord, LABEL_ENV, LABEL_MANAGED, LABEL_MEMBER, MANAGED_BY } from "./model.js";
import { type ClaimRecord, type EnvDeps, readEnv } from "./ops.js";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);

export interface CollectorCounters {
  runs: number;
  claimsReleased: number;
  vmsRemoved: number;
  volumesRemoved: number;
  addressesReleased: number;
  addressesAdopted: number;
  errors: number;
}

export class Collector {
  readonly counters: CollectorCounters = {
    runs: 0,
    claimsReleased: 0,
    vmsRemoved: 0,
    volumesRemoved: 0,
    addressesReleased: 0,
    addressesAdopted: 0,
    errors: 0,
  };
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<void> | undefined;
  #stopped = false;
  readonly #log: Logger;

  constructor(private readonly deps: EnvDeps) {
    this.#log = deps.logger;
  }

  /** Runs once now, then every `intervalMs`. */
  start(intervalMs: number): void {
    const tick = () => {
      if (this.#stopped || this.#running !== undefined) return;
      this.#running = this.runOnce()
        .catch((err: unknown) => {
          this.counters.errors += 1;
          this.#log.warn({ err }, "collector pass failed");
        })
        .finally(() => {
          this.#running = undefined;
        });
    };
    tick();
    this.#timer = setInterval(tick, intervalMs);
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#timer) clearInterval(this.#timer);
    await this.#running;
  }

  /** One pass: expired claims, then VMs and volumes nobody owns, then addresses. */
  async runOnce(): Promise<void> {
    this.counters.runs += 1;
    await this.collectClaims();
    await this.collectOrphans();
    await this.collectAddresses();
  }

  async collectClaims(): Promise<void> {
    const { store, clock } = this.deps;
    const now = clock.now();
    for (const [key, c] of await store.list<ClaimRecord>(keys.claimPrefix)) {
      if (c.deadlineMs > now) continue;
      const op = await store.get<{ state?: string } & { [k: string]: JsonValue | undefined }>(keys.op(c.op));
      if (op && !FINAL.has(op.state ?? "")) continue;
      const released = await store.transact(async (tx) => {
        const cur = await tx.get<ClaimRecord>(key);
        if (!cur) return false;
        const usage = usageFromStore(cur.usage);
        const e = await readEnv(tx, cur.env);
        const m = e?.members.find((x) => x.id === cur.member);
        const from = (cur as ClaimRecord & { migrationFrom?: string }).migrationFrom;
        if (from) {
          // A migration's claim charged only the destination agent (the tree already counts the
          // member). Unless the member was switched there, the destination's room goes back.
          if (m?.agent !== cur.agent) await this.deps.fleet.release(tx, cur.agent, usage);
          tx.del(key);
          return m?.agent !== cur.agent;
        }
        if (e && m?.vm) {
          // Confirmed after all (its VM exists): the member holds the room now; only the claim goes.
          tx.del(key);
          return false;
        }
        await this.deps.tree.release(tx, cur.node, usage);
        await this.deps.fleet.release(tx, cur.agent, usage);
        tx.del(key);
        if (e && m) {
          await releaseAddresses(tx, e.id, m);
          e.members = e.members.filter((x) => x.id !== cur.member);
          e.updateMs = now;
          if (e.members.length === 0 && e.createOp === cur.op) tx.del(keys.env(e.id));
          else tx.put(keys.env(e.id), e);
        }
        return true;
      });
      if (released) {
        this.counters.claimsReleased += 1;
        this.#log.info(
          {
            claim: key,
            op: `operations/${c.op}`,
            environment: `environments/${c.env}`,
            member: c.member,
            agent: `agents/${c.agent}`,
            node: `nodes/${c.node}`,
            opState: op?.state ?? "missing",
          },
          "collector released an expired reservation",
        );
      }
    }
  }

  #seq = 0;
  /** A request id of the collector's own (letters, digits and `.:-`, as agents require). */
  #requestId(name: string): string {
    const bare = name.replace(/^[a-z]+\//, "");
    return `collector:${bare}:${this.deps.clock.now().toString(36)}.${++this.#seq}`.slice(0, 128);
  }

  /** Whether `env`'s member `member` is placed on `agent` or an operation holds the environment. */
  async #owned(env: string, member: string, agent: string): Promise<boolean> {
    if (await this.deps.store.get(keys.lock(env))) return true;
    const e = await readEnv(this.deps.store, env);
    return e?.members.some((m) => m.id === member && m.agent === agent) ?? false;
  }

  async collectOrphans(): Promise<void> {
    const labels = { [LABEL_MANAGED]: MANAGED_BY };
    for (const view of this.deps.fleet.views()) {
      if (view.state === "down") continue;
      try {
        const clients = this.deps.fleet.clients(view.id);
        const a = { id: view.id, clients };
        const { vms } = await clients.vms.listVms({ labels, pageSize: 1000 });
        for (const vm of vms) {
          if (vm.labels[LABEL_MANAGED] !== MANAGED_BY) continue;
          const env = vm.labels[LABEL_ENV] ?? "";
          const member = vm.labels[LABEL_MEMBER] ?? "";
          if (await this.#owned(env, member, view.id)) continue;
          await deleteVm(a, env, member, this.#requestId(vm.name));
          this.counters.vmsRemoved += 1;
          this.#log.warn(
            { agent: `agents/${view.id}`, vm: vm.name, environment: `environments/${env}`, member },
            "collector removed a VM no environment member owns",
          );
        }
        const { volumes } = await clients.blocks.listVolumes({ labels, pageSize: 1000 });
        for (const v of volumes) {
          if (v.labels[LABEL_MANAGED] !== MANAGED_BY) continue;
          const env = v.labels[LABEL_ENV] ?? "";
          const member = v.labels[LABEL_MEMBER] ?? "";
          if (v.usedBy.length > 0 || (await this.#owned(env, member, view.id))) continue;
          const prefix = `volumes/${env}-${member}-`;
          if (!v.name.startsWith(prefix)) continue;
          await deleteVolume(a, env, member, v.name.slice(prefix.length), this.#requestId(v.name));
          this.counters.volumesRemoved += 1;
          this.#log.warn(
            { agent: `agents/${view.id}`, volume: v.name, environment: `environments/${env}`, member },
            "collector removed a volume no environment member owns",
          );
        }
      } catch (err) {
        this.counters.errors += 1;
        this.#log.warn({ err, agent: `agents/${view.id}` }, "collector could not check an agent");
      }
    }
  }

  /** Drops holdings of addresses whose NIC is gone; records explicit addresses that nothing holds. */
  async collectAddresses(): Promise<void> {
    const { store } = this.deps;
    const nicThere = (e: EnvRecord | undefined, h: AddressHolding, network: string) =>
      e?.members.some(
        (m) => m.id === h.member && nicsOf(m).some((n) => n.id === h.nic && n.network === network),
      ) ?? false;
    for (const [key, h] of await store.list<AddressHolding>(keys.addressPrefix())) {
      const network = `networks/${key.split("/")[1]}`;
      const dropped = await store.transact(async (tx) => {
        const cur = await tx.get<AddressHolding>(key);
        if (!cur || nicThere(await readEnv(tx, cur.env), cur, network)) return false;
        tx.del(key);
        return true;
      });
      if (!dropped) continue;
      this.counters.addressesReleased += 1;
      this.#log.info(
        { address: key, environment: `environments/${h.env}`, member: h.member, nic: h.nic },
        "collector released an address no member's NIC holds",
      );
    }
    const views = this.deps.fleet.views();
    for (const [, e] of await store.list<EnvRecord>(keys.envPrefix))
      for (const m of e.members)
        for (const nic of nicsOf(m)) {
          if (!nic.ipAddress || !nic.network) continue;
          let network: string;
          try {
            const seg = segmentOf(views, m.agent, nic.network);
            if (!seg) continue;
            network = seg.network;
          } catch {
            continue; // NETWORK_MISMATCH: the operator must settle the network first
          }
          const key = keys.address(network, nic.ipAddress);
          const h: AddressHolding = { env: e.id, member: m.id, nic: nic.id ?? "" };
          const outcome = await store.transact(async (tx) => {
            const cur = await tx.get<AddressHolding>(key);
            if (cur)
              return cur.env === h.env && cur.member === h.member && cur.nic === h.nic ? "held" : "other";
            const now = (await readEnv(tx, e.id))?.members.find((x) => x.id === m.id);
            if (!now || !nicsOf(now).some((n) => n.id === nic.id && n.ipAddress === nic.ipAddress))
              return "gone";
            tx.put(key, h);
            return "adopted";
          });
          if (outcome === "adopted") {
            this.counters.addressesAdopted += 1;
            this.#log.info(
              { address: key, environment: `environments/${e.id}`, member: m.id, nic: nic.id },
              "collector recorded an address a member had without a holding",
            );
          } else if (outcome === "other")
            this.#log.warn(
              { address: key, environment: `environments/${e.id}`, member: m.id, nic: nic.id },
              "a member's address on a shared network is held by another NIC: give one of them another address",
            );
        }
  }
}

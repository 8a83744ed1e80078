/**
 * Fencing (docs/adr/0017-failure-detection-and-fencing.md): an agent that answers again after being
 * DOWN is fenced before it takes new work. While the fleet holds it DOWN with its `fencing` mark set
 * (no member can be moved off it from then on, see `Fleet.replaceable`), `fence` destroys on it every
 * VM and volume of ours whose member now lives elsewhere (recreated by a reschedule while the agent was
 * away) or whose environment or member is gone; members still placed on it (reschedule policy NEVER,
 * or not moved yet) are kept, and the `up` event then adopts them back from their VM's state.
 *
 * Idempotent: it measures what the agent has and deletes only what is stale, with request ids of its
 * own; a coordinator crash in the middle leaves the agent DOWN, and the next heartbeat fences again.
 */
import type { Logger } from "@vmenv/rpc";
import { deleteVm, deleteVolume } from "../env/agent.js";
import { type EnvRecord, LABEL_ENV, LABEL_MANAGED, LABEL_MEMBER, MANAGED_BY } from "../env/model.js";
import type { AgentClients, Clock } from "../ports.js";
import { keys } from "../store/keys.js";
import type { Store } from "../store/store.js";

export interface FenceDeps {
  store: Store;
  clock: Clock;
  logger: Logger;
}

/** What one fence did. */
export interface FenceReport {
  vmsRemoved: string[];
  volumesRemoved: string[];
  kept: string[];
}

export interface FenceCounters {
  fences: number;
  vmsRemoved: number;
  volumesRemoved: number;
}

export class Fencer {
  readonly counters: FenceCounters = { fences: 0, vmsRemoved: 0, volumesRemoved: 0 };
  #seq = 0;
  constructor(private readonly deps: FenceDeps) {}

  /**
   * Whether `env`'s member `member` on `agent` is a stale copy: its member lives on another agent, or
   * its environment or member is gone and no operation holds the environment.
   */
  async #stale(agent: string, env: string, member: string): Promise<boolean> {
    const e = await this.deps.store.get<EnvRecord>(keys.env(env));
    const m = e?.members.find((x) => x.id === member);
    if (m) return m.agent !== "" && m.agent !== agent;
    return !(await this.deps.store.get(keys.lock(env)));
  }

  #requestId(agent: string, what: string): string {
    return `fence:${agent}:${what.replace(/^[a-z]+\//, "")}:${this.deps.clock.now().toString(36)}.${++this.#seq}`.slice(
      0,
      128,
    );
  }

  /** Destroys agent `agent`'s stale copies (see the module comment). Throws when the agent fails a call. */
  async fence(agent: string, clients: AgentClients): Promise<FenceReport> {
    const a = { id: agent, clients };
    const labels = { [LABEL_MANAGED]: MANAGED_BY };
    const report: FenceReport = { vmsRemoved: [], volumesRemoved: [], kept: [] };
    const { vms } = await clients.vms.listVms({ labels, pageSize: 1000 });
    for (const vm of vms) {
      if (vm.labels[LABEL_MANAGED] !== MANAGED_BY) continue;
      const env = vm.labels[LABEL_ENV] ?? "";
      const member = vm.labels[LABEL_MEMBER] ?? "";
      if (!(await this.#stale(agent, env, member))) {
        report.kept.push(vm.name);
        continue;
      }
      await deleteVm(a, env, member, this.#requestId(agent, vm.name));
      report.vmsRemoved.push(vm.name);
      this.counters.vmsRemoved += 1;
      this.deps.logger.warn(
        { agent: `agents/${agent}`, vm: vm.name, environment: `environments/${env}`, member },
        "fencing destroyed a copy replaced elsewhere",
      );
    }
    const { volumes } = await clients.blocks.listVolumes({ labels, pageSize: 1000 });
    for (const v of volumes) {
      if (v.labels[LABEL_MANAGED] !== MANAGED_BY) continue;
      const env = v.labels[LABEL_ENV] ?? "";
      const member = v.labels[LABEL_MEMBER] ?? "";
      const prefix = `volumes/${env}-${member}-`;
      if (!v.name.startsWith(prefix) || !(await this.#stale(agent, env, member))) continue;
      await deleteVolume(a, env, member, v.name.slice(prefix.length), this.#requestId(agent, v.name));
      report.volumesRemoved.push(v.name);
      this.counters.volumesRemoved += 1;
      this.deps.logger.warn(
        { agent: `agents/${agent}`, volume: v.name, environment: `environments/${env}`, member },
        "fencing destroyed a volume replaced elsewhere",
      );
    }
    this.counters.fences += 1;
    this.deps.logger.info({ agent: `agents/${agent}`, ...report }, "fence done");
    return report;
  }
}

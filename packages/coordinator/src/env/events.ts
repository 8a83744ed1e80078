/**
 * Feeds the kinds' event hooks from the fleet and the process (seed 003: signals from the data space →
 * a plan computed from one snapshot → applied as one step):
 *
 * - an agent goes DOWN: its members become LOST, and `isDown` runs for each (a balancer drops them from
 *   its upstreams);
 * - an agent comes back: its LOST members take the state of their VM on it (FAILED when the VM is
 *   gone), and `isUp` runs;
 * - the coordinator starts: `coordinatorStart` runs for every environment no operation holds (a
 *   balancer repairs drifted upstreams).
 *
 * Each event's plan is written in one transaction; the outputs that changed are then pushed onto the
 * VMs' labels (best effort: the next event or start repairs a miss). Plans that add or remove members
 * on such events are logged, not applied. Moving LOST members to other agents is env/reschedule.ts's
 * work (by their ReschedulePolicy), and a returning agent is fenced (fleet/fencing.ts) before `up`.
 */
import { VmState } from "@vmenv/api/agent/v1";
import { keys } from "../store/keys.js";
import { getVm, syncOutputs } from "./agent.js";
import { builtinKinds, planEvent } from "./kinds.js";
import type { EnvRecord, MemberStateName } from "./model.js";
import type { EnvDeps } from "./ops.js";

/**
 * Whether a member waits for its agent to come back: LOST, or FAILED because rescheduling it elsewhere
 * gave up (it still has the `lostState` the down event gave it; env/reschedule.ts).
 */
const awaitsAgent = (m: { state: MemberStateName; lostState?: unknown }) =>
  m.state === "LOST" || (m.state === "FAILED" && m.lostState !== undefined);

export class MemberEvents {
  #seq = 0;
  constructor(private readonly deps: EnvDeps) {}

  /** Subscribes to the fleet's `down` and `up` events. */
  attach(fleet: {
    on(e: "down" | "up", fn: (v: { id: string; stateMessage: string }) => void): unknown;
  }): void {
    fleet.on("down", (v) => {
      this.agentDown(v.id, v.stateMessage).catch((err: unknown) =>
        this.deps.logger.warn({ err, agent: `agents/${v.id}` }, "isDown hooks failed"),
      );
    });
    fleet.on("up", (v) => {
      this.agentUp(v.id).catch((err: unknown) =>
        this.deps.logger.warn({ err, agent: `agents/${v.id}` }, "isUp hooks failed"),
      );
    });
  }

  async agentDown(agent: string, why: string): Promise<void> {
    await this.#each(
      (e) => e.members.some((m) => m.agent === agent && m.state !== "DELETING" && m.state !== "LOST"),
      async (e) => {
        const ids: string[] = [];
        for (const m of e.members)
          if (m.agent === agent && m.state !== "DELETING" && m.state !== "LOST") {
            // The state it had, so that a reschedule (env/reschedule.ts) starts it again if it ran.
            m.lostState = m.state;
            m.state = "LOST";
            m.stateMessage = `agents/${agent} is down${why ? `: ${why}` : ""}`;
            ids.push(m.id);
          }
        return ids.map((id) => ["isDown", id] as const);
      },
    );
  }

  async agentUp(agent: string): Promise<void> {
    const lost = new Map<string, MemberStateName>();
    const clients = this.deps.fleet.clients(agent);
    for (const [, e] of await this.deps.store.list<EnvRecord>(keys.envPrefix))
      for (const m of e.members)
        if (m.agent === agent && awaitsAgent(m)) {
          const vm = await getVm({ id: agent, clients }, e.id, m.id).catch(() => undefined);
          const s = vm?.state;
          lost.set(
            `${e.id}/${m.id}`,
            s === VmState.RUNNING
              ? "RUNNING"
              : s === VmState.PAUSED
                ? "PAUSED"
                : s === undefined
                  ? "FAILED"
                  : "STOPPED",
          );
        }
    await this.#each(
      (e) => e.members.some((m) => lost.has(`${e.id}/${m.id}`)),
      async (e) => {
        const ids: string[] = [];
        for (const m of e.members) {
          const s = lost.get(`${e.id}/${m.id}`);
          if (!s || !awaitsAgent(m)) continue;
          m.state = s;
          delete m.lostState;
          m.stateMessage = s === "FAILED" ? `its VM is gone from agents/${agent}` : "";
          ids.push(m.id);
        }
        return ids.map((id) => ["isUp", id] as const);
      },
    );
  }

  /** Runs `coordinatorStart` for every environment no operation holds. */
  async coordinatorStart(): Promise<void> {
    const locked = new Set(
      (await this.deps.store.list<string>("lock/")).map(([k]) => k.slice("lock/".length)),
    );
    await this.#each(
      (e) => !locked.has(e.id),
      async () => [["coordinatorStart", undefined] as const],
    );
  }

  /**
   * For each environment `wanted` selects: in one transaction, `change` updates the record and names
   * the events to run; the events' plans set outputs; then changed outputs go to the VMs' labels.
   */
  async #each(
    wanted: (e: EnvRecord) => boolean,
    change: (
      e: EnvRecord,
    ) => Promise<ReadonlyArray<readonly ["isDown" | "isUp" | "coordinatorStart", string | undefined]>>,
  ): Promise<void> {
    const kinds = this.deps.kinds ?? builtinKinds;
    for (const [, seen] of await this.deps.store.list<EnvRecord>(keys.envPrefix)) {
      if (!wanted(seen)) continue;
      const changed = await this.deps.store.transact(async (tx) => {
        const e = await tx.get<EnvRecord>(keys.env(seen.id));
        if (!e || !wanted(e)) return [];
        const events = await change(e);
        const out = new Set<string>();
        for (const [event, member] of events) {
          const plan = planEvent(
            { id: e.id, node: e.node, labels: e.labels, members: e.members },
            event,
            member,
            kinds,
          );
          if (plan.added.length > 0 || plan.removed.length > 0)
            this.deps.logger.info(
              {
                environment: `environments/${e.id}`,
                event,
                add: plan.added.map((m) => m.id),
                remove: plan.removed.map((m) => m.id),
              },
              "hooks planned members to add or remove; left to the rescheduler",
            );
          for (const id of plan.changed) {
            const m = e.members.find((x) => x.id === id);
            const p = plan.members.find((x) => x.id === id);
            if (m && p) m.outputs = p.outputs;
            out.add(id);
          }
        }
        e.updateMs = this.deps.clock.now();
        tx.put(keys.env(e.id), e);
        return e.members.filter((m) => out.has(m.id));
      });
      for (const m of changed) {
        if (!m.agent || m.state === "LOST") continue;
        try {
          await syncOutputs(
            { id: m.agent, clients: this.deps.fleet.clients(m.agent) },
            seen.id,
            m,
            `hooks-${seen.id}-${m.id}-${this.deps.clock.now().toString(36)}-${++this.#seq}`,
          );
        } catch (err) {
          this.deps.logger.warn(
            { err, environment: `environments/${seen.id}`, member: m.id },
            "could not set outputs on the VM",
          );
        }
      }
    }
  }
}

/**
 * EvacuateAgent (docs/adr/0017-failure-detection-and-fencing.md): for a DOWN agent, an `agent.evacuate`
 * operation that reschedules its members now, regardless of their policy's delay and attempts limit, as
 * one child `environment.reschedule` operation per environment. Members whose policy is NEVER stay LOST
 * (the API's promise); the agent is fenced if it ever answers again, like any DOWN agent.
 *
 * With `force` the agent need not be DOWN: a first step marks it DOWN the way a missed heartbeat
 * deadline does (its members become LOST, `isDown` hooks run) and holds it DOWN while the operation
 * runs, so that a live agent answering its heartbeats is not fenced back in the middle (which would
 * make every reschedule fail with AGENT_RETURNED). The hold ends with the operation; the agent's next
 * answer then fences it — its copies recreated elsewhere are destroyed — before it is READY.
 *
 * A forced agent that still answers has each member's old copy stopped (force) just before the new
 * copy starts (RescheduleInput.stopOld), so that the two never run together; a member that cannot be
 * moved keeps running where it is.
 */
import { failedPrecondition, VmenvError } from "@vmenv/rpc/errors";
import type { EnvRecord } from "../env/model.js";
import { RESCHEDULE_KIND, type RescheduleInput, reschedulePolicy } from "../env/reschedule.js";
import type { OperationKind, OpRecord, StepDef } from "../ops/types.js";
import { keys } from "../store/keys.js";
import type { JsonValue, Store, Txn } from "../store/store.js";
import type { AgentView } from "./fleet.js";

export const EVACUATE_KIND = "agent.evacuate";

export interface EvacuateInput {
  [k: string]: JsonValue | undefined;
  agent: string;
  /** Mark the agent DOWN first (and hold it DOWN while the operation runs). */
  force?: boolean;
}

export interface EvacuateDeps {
  store: Store;
  fleet: {
    get(id: string): AgentView;
    /** Marks the agent DOWN for operation `op` and holds it DOWN (Fleet.holdDown). */
    holdDown(id: string, op: string, message: string): Promise<unknown>;
    /** Ends operation `op`'s hold, in its final transaction (Fleet.releaseHold). */
    releaseHold(tx: Txn, id: string, op: string): Promise<void>;
  };
  /** Makes the members on a DOWN agent LOST (MemberEvents.agentDown; idempotent). */
  events: { agentDown(agent: string, why: string): Promise<void> };
}

/**
 * FAILED_PRECONDITION (AGENT_NOT_DOWN, naming its state) unless agent `id` is DOWN, or `force` and not
 * DRAINING (AGENT_DRAINING); in either case AGENT_FENCING while it is being fenced.
 */
export function checkEvacuable(fleet: Pick<EvacuateDeps["fleet"], "get">, id: string, force = false): void {
  const v = fleet.get(id);
  if (force && v.state === "draining")
    throw failedPrecondition(
      `agents/${id} is being drained by ${v.operation ? `operations/${v.operation}` : "an operation"}; cancel the drain first`,
      "AGENT_DRAINING",
      { agent: `agents/${id}`, ...(v.operation ? { operation: `operations/${v.operation}` } : {}) },
    );
  if (v.state !== "down" && !force)
    throw failedPrecondition(
      `agents/${id} is ${v.state.toUpperCase()}, not DOWN: only a DOWN agent can be evacuated (drain a live one, or evacuate it with force if it is dead or will be fenced)`,
      "AGENT_NOT_DOWN",
      { agent: `agents/${id}`, state: v.state.toUpperCase() },
    );
  if (v.stateMessage.startsWith("fencing:"))
    throw failedPrecondition(
      `agents/${id} answers again and is being fenced; its members stay there`,
      "AGENT_FENCING",
      { agent: `agents/${id}` },
    );
}

/** The operation kind `agent.evacuate`. */
export function evacuateKind(deps: EvacuateDeps): OperationKind {
  return {
    kind: EVACUATE_KIND,
    cancellable: false,
    plan(op) {
      const inp = op.input as EvacuateInput;
      const steps: StepDef[] = [];
      if (inp.force)
        steps.push({
          id: "down",
          description: `mark agents/${inp.agent} DOWN and hold it DOWN until the evacuation ends`,
          agent: `agents/${inp.agent}`,
          async run(ctx) {
            const why = `evacuated by operations/${ctx.op.id} (EvacuateAgent with force: the operator vouches that it is dead or will be fenced)`;
            await deps.fleet.holdDown(inp.agent, ctx.op.id, why);
            // The fleet's `down` event does this too, in the background; the members must be LOST now.
            await deps.events.agentDown(inp.agent, why);
          },
        });
      steps.push({
        id: "select",
        description: `find the environments with members on agents/${inp.agent}`,
        async run(ctx) {
          checkEvacuable(deps.fleet, inp.agent);
          const envs: string[] = [];
          const never: string[] = [];
          for (const [, e] of await deps.store.list<EnvRecord>(keys.envPrefix)) {
            const here = e.members.filter((m) => m.agent === inp.agent && m.state !== "DELETING");
            if (here.some((m) => reschedulePolicy(m).mode === "RECREATE")) envs.push(e.id);
            for (const m of here)
              if (reschedulePolicy(m).mode !== "RECREATE") never.push(`environments/${e.id}/${m.id}`);
          }
          await ctx.save({ envs, never });
        },
      });
      for (const env of (op.data.envs ?? []) as string[])
        steps.push({
          id: `env.${env}`,
          description: `reschedule the members of environments/${env} on agents/${inp.agent}`,
          async run(ctx) {
            const input: RescheduleInput = {
              env,
              from: inp.agent,
              members: [],
              evacuate: true,
              ...(inp.force ? { stopOld: true } : {}),
            };
            const child = await ctx.child(RESCHEDULE_KIND, `environments/${env}`, input);
            if (child.state !== "succeeded")
              await ctx.save({ [`failed.${env}`]: child.error?.message ?? child.state });
          },
        });
      if (op.data.envs !== undefined)
        steps.push({
          id: "report",
          description: "report environments that could not be rescheduled",
          async run(ctx) {
            const failed = Object.entries(ctx.op.data).filter(([k]) => k.startsWith("failed."));
            if (failed.length > 0)
              throw new VmenvError(
                "aborted",
                `agents/${inp.agent}: ${failed.length} environment(s) could not be rescheduled: ${failed
                  .map(([k, v]) => `environments/${k.slice("failed.".length)}: ${String(v)}`)
                  .join("; ")}`,
                {
                  reason: "EVACUATION_INCOMPLETE",
                  metadata: {
                    agent: `agents/${inp.agent}`,
                    environments: failed.map(([k]) => k.slice("failed.".length)).join(","),
                  },
                },
              );
          },
        });
      return steps;
    },
    // A forced evacuation's hold ends with it, in its final transaction (a crash cannot leave it behind).
    async result(op, tx) {
      await deps.fleet.releaseHold(tx, (op.input as EvacuateInput).agent, op.id);
      return undefined;
    },
    async onFailed(op, tx) {
      await deps.fleet.releaseHold(tx, (op.input as EvacuateInput).agent, op.id);
    },
  };
}

/** Starts the evacuation of agent `id` (checked first, so a refusal is the call's error). */
export async function startEvacuation(
  deps: Pick<EvacuateDeps, "fleet"> & {
    engine: {
      start(kind: string, target: string, input: JsonValue, o: { requestId?: string }): Promise<OpRecord>;
    };
  },
  id: string,
  requestId: string,
  force = false,
): Promise<OpRecord> {
  checkEvacuable(deps.fleet, id, force);
  const input: EvacuateInput = force ? { agent: id, force } : { agent: id };
  return deps.engine.start(EVACUATE_KIND, `agents/${id}`, input, requestId ? { requestId } : {});
}

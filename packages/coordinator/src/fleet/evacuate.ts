/**
 * EvacuateAgent (docs/adr/0017-failure-detection-and-fencing.md): for a DOWN agent, an `agent.evacuate`
 * operation that reschedules its members now, regardless of their policy's delay and attempts limit, as
 * one child `environment.reschedule` operation per environment. Members whose policy is NEVER stay LOST
 * (the API's promise); the agent is fenced if it ever answers again, like any DOWN agent.
 */
import { failedPrecondition, VmenvError } from "@vmenv/rpc/errors";
import type { EnvRecord } from "../env/model.js";
import { RESCHEDULE_KIND, type RescheduleInput, reschedulePolicy } from "../env/reschedule.js";
import type { OperationKind, OpRecord, StepDef } from "../ops/types.js";
import { keys } from "../store/keys.js";
import type { JsonValue, Store } from "../store/store.js";
import type { AgentView } from "./fleet.js";

export const EVACUATE_KIND = "agent.evacuate";

export interface EvacuateInput {
  [k: string]: JsonValue | undefined;
  agent: string;
}

export interface EvacuateDeps {
  store: Store;
  fleet: { get(id: string): AgentView };
}

/** FAILED_PRECONDITION (AGENT_NOT_DOWN, naming its state) unless agent `id` is DOWN and not being fenced. */
export function checkEvacuable(fleet: EvacuateDeps["fleet"], id: string): void {
  const v = fleet.get(id);
  if (v.state !== "down")
    throw failedPrecondition(
      `agents/${id} is ${v.state.toUpperCase()}, not DOWN: only a DOWN agent can be evacuated (drain a live one)`,
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
      const steps: StepDef[] = [
        {
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
        },
      ];
      for (const env of (op.data.envs ?? []) as string[])
        steps.push({
          id: `env.${env}`,
          description: `reschedule the members of environments/${env} on agents/${inp.agent}`,
          async run(ctx) {
            const input: RescheduleInput = { env, from: inp.agent, members: [], evacuate: true };
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
  };
}

/** Starts the evacuation of agent `id` (checked first, so a refusal is the call's error). */
export async function startEvacuation(
  deps: EvacuateDeps & {
    engine: {
      start(kind: string, target: string, input: JsonValue, o: { requestId?: string }): Promise<OpRecord>;
    };
  },
  id: string,
  requestId: string,
): Promise<OpRecord> {
  checkEvacuable(deps.fleet, id);
  const input: EvacuateInput = { agent: id };
  return deps.engine.start(EVACUATE_KIND, `agents/${id}`, input, requestId ? { requestId } : {});
}

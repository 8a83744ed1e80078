import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { EnvironmentService, MemberSchema, RescheduleMode } from "@vmenv/api/coordinator/v1";
import { createLogger, errorMapperInterceptor } from "@vmenv/rpc";
import { describe, expect, it } from "vitest";
import { startEvacuation } from "../fleet/evacuate.js";
import { createInput, fleetWorld } from "../fleet/testing/world.js";
import { toPbOperation } from "../ops/convert.js";
import type { OperationEngine } from "../ops/engine.js";
import { keys } from "../store/keys.js";
import { type AddressHolding, nicsOf } from "./addresses.js";
import { Collector } from "./collector.js";
import { envToPb, memberFromPb } from "./convert.js";
import { MIGRATE_KIND } from "./migrate.js";
import type { MemberRecord } from "./model.js";
import { environmentService } from "./rpc.js";

const MIB = 1024n * 1024n;

/** `lan` is uplinked (shared) on every agent; `loc` is local to each. */
const LAN = { name: "networks/lan", cidr: "10.9.0.0/24", gateway: "10.9.0.1", uplink: "veth-up" };
const LOC = { name: "networks/loc", cidr: "10.50.0.0/24", gateway: "10.50.0.1", uplink: "" };

type World = Awaited<ReturnType<typeof fleetWorld>>;

const world = (networks = (_agent: string) => [LAN, LOC]) =>
  fleetWorld(["a1", "a2", "a3"], { vcpus: 16, memoryBytes: 4000n * MIB }, { networks });

/** A 100 MiB member with one NIC `eth0` on `network` (explicit `ip` when given). */
function nicMember(
  id: string,
  opts: { network?: string; ip?: string; role?: string; agent?: string; recreate?: boolean } = {},
): MemberRecord {
  return memberFromPb(
    create(MemberSchema, {
      id,
      role: opts.role ?? "",
      spec: {
        vcpus: 1,
        memoryBytes: 100n * MIB,
        boot: { method: { case: "directKernel", value: { kernelPath: "/k" } } },
        nics: [{ id: "eth0", network: opts.network ?? "networks/lan", ipAddress: opts.ip ?? "" }],
      },
      ...(opts.agent ? { placement: { agent: `agents/${opts.agent}` } } : {}),
      ...(opts.recreate
        ? { reschedulePolicy: { mode: RescheduleMode.RECREATE, delay: durationFromMs(3_600_000) } }
        : {}),
    }),
  );
}

/** Runs a create on `engine` (the world's by default) and returns the finished operation. */
async function tryCreate(w: World, env: string, members: MemberRecord[], engine: OperationEngine = w.engine) {
  const op = await engine.start("environment.create", `environments/${env}`, createInput(env, members));
  return engine.wait(op.id, 10_000);
}

/** The address of member `member`'s first NIC in environment `env`'s record. */
const ipOf = async (w: World, env: string, member: string) => {
  const m = (await w.env(env)).members.find((x) => x.id === member);
  return nicsOf(m ?? { spec: null })[0]?.ipAddress;
};

/** The address the agent's VM of `env`/`member` was given (CreateVm's or PrepareVmMigration's spec). */
const vmIp = (w: World, agent: string, env: string, member: string) =>
  w.agent(agent).vms.get(`vms/${env}-${member}`)?.spec?.nics[0]?.ipAddress;

/** Every holding: [network/address, env, member, nic]. */
const held = async (w: World) =>
  (await w.store.list<AddressHolding>(keys.addressPrefix())).map(([k, h]) => [
    k.slice("addr/".length),
    h.env,
    h.member,
    h.nic,
  ]);

describe("addresses on shared networks, allocated by the coordinator", () => {
  it("gives two environments on two agents distinct addresses, in the spec the agent and the API get", async () => {
    const w = await world();
    await w.createOn("a1", "one", [nicMember("web-1")]);
    await w.createOn("a2", "two", [nicMember("web-1")]);
    expect(await w.where("one")).toEqual([["web-1", "a1", "RUNNING"]]);
    expect(await w.where("two")).toEqual([["web-1", "a2", "RUNNING"]]);
    expect([await ipOf(w, "one", "web-1"), await ipOf(w, "two", "web-1")]).toEqual(["10.9.0.2", "10.9.0.3"]);
    expect([vmIp(w, "a1", "one", "web-1"), vmIp(w, "a2", "two", "web-1")]).toEqual(["10.9.0.2", "10.9.0.3"]);
    expect(await held(w)).toEqual([
      ["lan/10.9.0.2", "one", "web-1", "eth0"],
      ["lan/10.9.0.3", "two", "web-1", "eth0"],
    ]);
    // GetEnvironment (and `vmenv env get`) shows it in the member's spec.
    expect(envToPb(await w.env("two")).members[0]?.spec?.nics[0]?.ipAddress).toBe("10.9.0.3");
  });

  it("never hands out the gateway; a full network is RESOURCE_EXHAUSTED and the add leaves nothing", async () => {
    const small = { ...LAN, cidr: "10.9.0.0/29", gateway: "10.9.0.3" }; // hosts .1-.6
    const w = await world(() => [small]);
    await w.createOn(
      "a1",
      "one",
      ["m-1", "m-2", "m-3", "m-4", "m-5"].map((id) => nicMember(id)),
    );
    const ips = [];
    for (const id of ["m-1", "m-2", "m-3", "m-4", "m-5"]) ips.push(await ipOf(w, "one", id));
    expect(ips).toEqual(["10.9.0.1", "10.9.0.2", "10.9.0.4", "10.9.0.5", "10.9.0.6"]);
    const add = await w.engine.start("environment.add_member", "environments/one", {
      env: "one",
      member: nicMember("m-6"),
    });
    const done = await w.engine.wait(add.id, 10_000);
    expect([done.state, done.error?.code, done.error?.reason]).toEqual([
      "failed",
      "resource-exhausted",
      "NETWORK_FULL",
    ]);
    expect(done.error?.message).toBe("networks/lan (10.9.0.0/29) has no free address left");
    expect((await w.env("one")).members.map((m) => m.id)).toEqual(["m-1", "m-2", "m-3", "m-4", "m-5"]);
    expect(await held(w)).toHaveLength(5);
  });

  it("records an explicit address, and refuses it to another member naming the holder", async () => {
    const w = await world();
    await w.createOn("a1", "one", [nicMember("web-1", { ip: "10.9.0.2" }), nicMember("web-2")]);
    expect([await ipOf(w, "one", "web-1"), await ipOf(w, "one", "web-2")]).toEqual(["10.9.0.2", "10.9.0.3"]);
    const done = await tryCreate(w, "two", [nicMember("db-1", { ip: "10.9.0.2", agent: "a2" })]);
    expect([done.state, done.error?.code, done.error?.reason]).toEqual([
      "failed",
      "failed-precondition",
      "IP_ADDRESS_IN_USE",
    ]);
    expect(done.error?.message).toBe(
      "10.9.0.2 on networks/lan is already used by member web-1 (NIC eth0) of environments/one",
    );
    expect(done.error?.metadata).toMatchObject({
      environment: "environments/one",
      member: "web-1",
      nic: "eth0",
      ip_address: "10.9.0.2",
    });
    expect(await w.store.get(keys.env("two"))).toBeUndefined();
    expect(w.agent("a2").vms.size).toBe(0);
    // The gateway, or an address outside the network, is refused as the agent would.
    const gw = await tryCreate(w, "three", [nicMember("db-1", { ip: "10.9.0.1" })]);
    expect([gw.error?.reason, gw.error?.message]).toEqual([
      "IP_ADDRESS_IS_GATEWAY",
      "invalid members[db-1].spec.nics[0].ip_address: 10.9.0.1 is the gateway of networks/lan",
    ]);
    expect((await tryCreate(w, "four", [nicMember("db-1", { ip: "10.8.0.5" })])).error?.reason).toBe(
      "IP_ADDRESS_OUTSIDE_CIDR",
    );
    expect(await held(w)).toHaveLength(2);
  });

  it("CreateEnvironment and AddMember refuse a taken address before anything starts, naming the field", async () => {
    const w = await world();
    await w.createOn("a1", "one", [nicMember("web-1", { ip: "10.9.0.5" })]);
    const b = environmentService({
      ...w.deps,
      engine: w.engine,
      toOperation: (op) => toPbOperation(op, () => ({}), false),
    });
    const silent = createLogger("t", "silent");
    const transport = createRouterTransport(({ service }) => service(b.service, b.impl as never), {
      router: { interceptors: [errorMapperInterceptor(silent)] },
    });
    const client = createClient(EnvironmentService, transport);
    const spec = (ip: string) => ({
      vcpus: 1,
      memoryBytes: 100n * MIB,
      boot: { method: { case: "directKernel" as const, value: { kernelPath: "/k" } } },
      nics: [{ id: "eth0", network: "networks/lan", ipAddress: ip }],
    });
    const refused = async (p: Promise<unknown>) => {
      const err = await p.then(
        () => undefined,
        (e: unknown) => ConnectError.from(e),
      );
      return [err?.code, err?.rawMessage];
    };
    expect(
      await refused(
        client.createEnvironment({
          environmentId: "two",
          environment: {
            node: "nodes/acme",
            members: [
              { id: "db-1", spec: spec("") },
              { id: "db-2", spec: spec("10.9.0.5") },
            ],
          },
        }),
      ),
    ).toEqual([
      Code.FailedPrecondition,
      "10.9.0.5 on networks/lan is already used by member web-1 (NIC eth0) of environments/one",
    ]);
    expect(
      await refused(
        client.addMember({ name: "environments/one", member: { id: "web-2", spec: spec("10.9.0.0") } }),
      ),
    ).toEqual([
      Code.InvalidArgument,
      "invalid member.spec.nics[0].ip_address: 10.9.0.0 is the network or broadcast address of 10.9.0.0/24",
    ]);
    expect(await w.store.get(keys.env("two"))).toBeUndefined();
    expect(await held(w)).toEqual([["lan/10.9.0.5", "one", "web-1", "eth0"]]);
  });

  it("releases on delete and remove: the address is handed out again", async () => {
    const w = await world();
    await w.createOn("a1", "one", [nicMember("web-1")]);
    await w.createOn("a2", "two", [nicMember("web-1")]);
    const del = await w.engine.start("environment.delete", "environments/one", { env: "one", force: true });
    expect((await w.engine.wait(del.id, 10_000)).state).toBe("succeeded");
    expect(await held(w)).toEqual([["lan/10.9.0.3", "two", "web-1", "eth0"]]);
    await w.createOn("a3", "three", [nicMember("web-1")]);
    expect(await ipOf(w, "three", "web-1")).toBe("10.9.0.2");

    const add = await w.engine.start("environment.add_member", "environments/two", {
      env: "two",
      member: nicMember("web-2"),
    });
    expect((await w.engine.wait(add.id, 10_000)).state).toBe("succeeded");
    expect(await ipOf(w, "two", "web-2")).toBe("10.9.0.4");
    const rm = await w.engine.start("environment.remove_member", "environments/two", {
      env: "two",
      member: "web-2",
      force: true,
    });
    expect((await w.engine.wait(rm.id, 10_000)).state).toBe("succeeded");
    expect(await held(w)).toEqual([
      ["lan/10.9.0.2", "three", "web-1", "eth0"],
      ["lan/10.9.0.3", "two", "web-1", "eth0"],
    ]);
  });

  it("releases what a failed create held when it rolls back", async () => {
    const w = await world();
    w.agent("a1").failCreateVm = true;
    const done = await tryCreate(w, "one", [nicMember("web-1", { agent: "a1" })]);
    expect(done.state).toBe("failed");
    expect(done.error?.message).toContain("no room for the VMM");
    expect(await held(w)).toEqual([]);
  });

  it("gives a balancer its own address, not its first member's", async () => {
    const w = await world();
    await w.createOn("a1", "shop", [
      nicMember("web-1", { role: "web" }),
      nicMember("web-2", { role: "web", ip: "10.9.0.9" }),
    ]);
    const e = await w.env("shop");
    expect(e.members.map((m) => m.id)).toEqual(["web-1", "web-2", "web-lb"]);
    expect([
      await ipOf(w, "shop", "web-1"),
      await ipOf(w, "shop", "web-2"),
      await ipOf(w, "shop", "web-lb"),
    ]).toEqual(["10.9.0.2", "10.9.0.9", "10.9.0.3"]);
  });

  it("keeps the address of a create cut by a crash at any point, resumed by a new engine", async () => {
    let points = 0;
    for (let n = 1; ; n++) {
      const w = await world();
      await w.createOn("a1", "one", [nicMember("web-1")]);
      const crashing: OperationEngine = w.newEngine({ crashPoint: n, crash: () => crashing.freeze() });
      const op = await crashing.start(
        "environment.create",
        "environments/two",
        createInput("two", [nicMember("db-1")]),
      );
      await crashing.idle();
      const after = await w.engine.get(op.id);
      if (after.state === "succeeded") break; // n is past the last crash point
      points = n;
      expect(after.state, `crash point ${n}`).toBe("running");
      const next = w.newEngine();
      await next.resumeAll();
      const done = await next.wait(op.id, 10_000);
      expect(done.state, `crash point ${n}: ${JSON.stringify(done.error)}`).toBe("succeeded");
      const m = (await w.env("two")).members[0] as MemberRecord;
      expect(await ipOf(w, "two", "db-1"), `crash point ${n}`).toBe("10.9.0.3");
      expect(vmIp(w, m.agent, "two", "db-1"), `crash point ${n}`).toBe("10.9.0.3");
      expect(await held(w), `crash point ${n}`).toEqual([
        ["lan/10.9.0.2", "one", "web-1", "eth0"],
        ["lan/10.9.0.3", "two", "db-1", "eth0"],
      ]);
      await next.stop();
    }
    expect(points).toBe(12); // claim, vm, outputs, start: three points each
  });

  it("keeps the address and its holding when a member migrates", async () => {
    const w = await world();
    await w.createOn("a1", "shop", [nicMember("web-1")]);
    const op = await w.engine.start(MIGRATE_KIND, "environments/shop", {
      env: "shop",
      members: [],
      agent: "a2",
      from: "",
      settings: null,
    });
    const done = await w.engine.wait(op.id, 10_000);
    expect(done.state, JSON.stringify(done.error)).toBe("succeeded");
    expect(await w.where("shop")).toEqual([["web-1", "a2", "RUNNING"]]);
    expect(await ipOf(w, "shop", "web-1")).toBe("10.9.0.2");
    expect(vmIp(w, "a2", "shop", "web-1")).toBe("10.9.0.2");
    expect(await held(w)).toEqual([["lan/10.9.0.2", "shop", "web-1", "eth0"]]);
  });

  it("keeps the address and its holding when a member is recreated on another agent", async () => {
    const w = await world();
    await w.createOn("a1", "shop", [nicMember("web-1", { recreate: true })]);
    await w.fleet.cordon("a3", "keep out");
    const op = await startEvacuation({ fleet: w.fleet, engine: w.engine }, "a1", "", true);
    const done = await w.engine.wait(op.id, 10_000);
    expect(done.state, JSON.stringify(done.error)).toBe("succeeded");
    expect(await w.where("shop")).toEqual([["web-1", "a2", "RUNNING"]]);
    expect(vmIp(w, "a2", "shop", "web-1")).toBe("10.9.0.2");
    expect(await held(w)).toEqual([["lan/10.9.0.2", "shop", "web-1", "eth0"]]);
  });

  it("leaves local networks to the agent: no address chosen, nothing held", async () => {
    const w = await world();
    await w.createOn("a1", "one", [nicMember("web-1", { network: "networks/loc" })]);
    await w.createOn("a2", "two", [nicMember("web-1", { network: "networks/loc", ip: "10.50.0.7" })]);
    expect(await ipOf(w, "one", "web-1")).toBeUndefined();
    expect(vmIp(w, "a1", "one", "web-1")).toBe("");
    expect(vmIp(w, "a2", "two", "web-1")).toBe("10.50.0.7");
    expect(await held(w)).toEqual([]);
  });

  it("refuses a shared network that two agents report with different CIDRs, naming both", async () => {
    const w = await world((agent) => [
      agent === "a2" ? { ...LAN, cidr: "10.8.0.0/24", gateway: "10.8.0.1" } : LAN,
    ]);
    const done = await tryCreate(w, "one", [nicMember("web-1", { agent: "a1" })]);
    expect([done.state, done.error?.code, done.error?.reason]).toEqual([
      "failed",
      "failed-precondition",
      "NETWORK_MISMATCH",
    ]);
    expect(done.error?.message).toBe(
      "networks/lan is shared (uplinked) on agents/a1 as 10.9.0.0/24 with gateway 10.9.0.1 and on agents/a2 as 10.8.0.0/24 with gateway 10.8.0.1: agents sharing a network by name must give it the same cidr and gateway",
    );
    expect(done.error?.metadata).toMatchObject({ agent: "agents/a1", other_agent: "agents/a2" });
    // The same name without an uplink is another agent's local network: no mismatch.
    const v = await world((agent) => [agent === "a2" ? { ...LOC, name: "networks/lan" } : LAN]);
    expect((await tryCreate(v, "one", [nicMember("web-1", { agent: "a1" })])).state).toBe("succeeded");
  });

  it("collector: drops holdings no NIC has, records explicit addresses nothing holds", async () => {
    const w = await world();
    await w.createOn("a1", "one", [nicMember("web-1", { ip: "10.9.0.7" }), nicMember("web-2")]);
    await w.store.transact(async (tx) => {
      // A member given its address before the coordinator held addresses, and a holding left behind.
      tx.del(keys.address("lan", "10.9.0.7"));
      tx.put(keys.address("lan", "10.9.0.9"), { env: "gone", member: "x", nic: "eth0" });
    });
    const collector = new Collector(w.deps);
    await collector.collectAddresses();
    expect(await held(w)).toEqual([
      ["lan/10.9.0.2", "one", "web-2", "eth0"],
      ["lan/10.9.0.7", "one", "web-1", "eth0"],
    ]);
    expect(collector.counters).toMatchObject({ addressesReleased: 1, addressesAdopted: 1 });
    await collector.collectAddresses();
    expect(collector.counters).toMatchObject({ addressesReleased: 1, addressesAdopted: 1 });
  });
});

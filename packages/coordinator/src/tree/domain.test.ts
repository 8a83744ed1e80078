import { VmenvError } from "@vmenv/rpc/errors";
import { describe, expect, it } from "vitest";
import { ZERO_USAGE } from "../domain/usage.js";
import {
  checkCharge,
  checkFitsAncestors,
  checkPath,
  effectiveOf,
  emptyPolicy,
  normalisePolicy,
  type Policy,
  pathChain,
  pathFromName,
  treeOrderKey,
} from "./domain.js";

const pol = (p: Partial<Policy>): Policy => ({ ...emptyPolicy(), ...p });

function caught(f: () => void): VmenvError {
  try {
    f();
  } catch (e) {
    if (e instanceof VmenvError) return e;
    throw e;
  }
  throw new Error("did not throw");
}

describe("node paths", () => {
  it("accepts 1-63 character segments of [a-z0-9-] starting with a letter or digit, up to 16 levels", () => {
    for (const p of ["acme", "acme/web/prod", "0day", "a-b-", "x".repeat(63), Array(16).fill("a").join("/")])
      expect(() => checkPath(p, "name")).not.toThrow();
  });

  it.each([
    ["", "INVALID_NODE_NAME"],
    ["Acme", "INVALID_NODE_NAME"],
    ["-acme", "INVALID_NODE_NAME"],
    ["acme//web", "INVALID_NODE_NAME"],
    ["acme/", "INVALID_NODE_NAME"],
    ["acme/../etc", "INVALID_NODE_NAME"],
    ["acme/./web", "INVALID_NODE_NAME"],
    ["ac me", "INVALID_NODE_NAME"],
    ["a_b", "INVALID_NODE_NAME"],
    ["x".repeat(64), "INVALID_NODE_NAME"],
    [Array(17).fill("a").join("/"), "NODE_TOO_DEEP"],
  ])("refuses %j with INVALID_ARGUMENT %s naming the field", (p, reason) => {
    const e = caught(() => checkPath(p, "parent"));
    expect(e.code).toBe("invalid-argument");
    expect(e.reason).toBe(reason);
    expect(e.fieldViolations[0]?.field).toBe("parent");
  });

  it("maps API names to paths and refuses other collections", () => {
    expect(pathFromName("nodes/acme/web", "name")).toBe("acme/web");
    expect(pathFromName("", "parent", true)).toBe("");
    expect(caught(() => pathFromName("vms/acme", "name")).reason).toBe("INVALID_NODE_NAME");
    expect(caught(() => pathFromName("", "name")).reason).toBe("INVALID_NODE_NAME");
    expect(caught(() => pathFromName("nodes/", "name")).reason).toBe("INVALID_NODE_NAME");
  });

  it("chains a path root first and orders a subtree before the parent's next sibling", () => {
    expect(pathChain("a/b/c")).toEqual(["a", "a/b", "a/b/c"]);
    const sorted = ["acme-x", "acme/web", "acme", "acme/web/prod", "acme/db"].sort((a, b) =>
      treeOrderKey(a) < treeOrderKey(b) ? -1 : 1,
    );
    expect(sorted).toEqual(["acme", "acme/db", "acme/web", "acme/web/prod", "acme-x"]);
  });
});

describe("policies", () => {
  it("refuses absurd limits, malformed networks and CPUs out of range, naming the field", () => {
    expect(
      caught(() => normalisePolicy(pol({ maxVcpus: -1 }), "node.policy")).fieldViolations[0]?.field,
    ).toBe("node.policy.max_vcpus");
    expect(caught(() => normalisePolicy(pol({ maxMemoryBytes: 1n << 61n }), "node.policy")).reason).toBe(
      "INVALID_POLICY",
    );
    expect(
      caught(() => normalisePolicy(pol({ allowedNetworks: ["lan"] }), "p")).fieldViolations[0]?.field,
    ).toBe("p.allowed_networks");
    expect(caught(() => normalisePolicy(pol({ allowedCpus: [9000] }), "p")).fieldViolations[0]?.field).toBe(
      "p.allowed_cpus",
    );
  });

  it("sorts and deduplicates the lists, keeps 0 (none allowed) apart from unset", () => {
    const p = normalisePolicy(
      pol({ maxGpus: 0, allowedCpus: [3, 1, 3], allowedNetworks: ["networks/b", "networks/a"] }),
      "p",
    );
    expect(p.maxGpus).toBe(0);
    expect("maxVms" in p).toBe(false);
    expect(p.allowedCpus).toEqual([1, 3]);
    expect(p.allowedNetworks).toEqual(["networks/a", "networks/b"]);
  });

  it("intersects allowed lists and unites host labels along the path", () => {
    const eff = effectiveOf([
      {
        path: "a",
        policy: pol({ allowedNetworks: ["networks/x", "networks/y"], allowedHostLabels: { zone: "1" } }),
      },
      { path: "a/b", policy: pol({ allowedCpus: [0, 1, 2] }) },
      {
        path: "a/b/c",
        policy: pol({
          allowedNetworks: ["networks/y"],
          allowedCpus: [2, 3],
          allowedHostLabels: { gpu: "yes" },
        }),
      },
    ]);
    expect(eff).toEqual({
      allowedNetworks: ["networks/y"],
      allowedHostLabels: { gpu: "yes", zone: "1" },
      allowedCpus: [2],
    });
    expect(effectiveOf([{ path: "a", policy: emptyPolicy() }])).toEqual({ allowedHostLabels: {} });
  });

  it("static rule: a limit above any ancestor's is refused naming the highest such ancestor", () => {
    const anc = [
      { path: "a", policy: pol({ maxVcpus: 8 }) },
      { path: "a/b", policy: pol({}) },
    ];
    const e = caught(() => checkFitsAncestors("a/b/c", pol({ maxVcpus: 9 }), anc));
    expect(e.code).toBe("failed-precondition");
    expect(e.reason).toBe("POLICY_EXCEEDS_PARENT");
    expect(e.metadata).toMatchObject({
      node: "nodes/a/b/c",
      parent: "nodes/a",
      field: "policy.max_vcpus",
      limit: "8",
      requested: "9",
    });
    expect(() => checkFitsAncestors("a/b/c", pol({ maxVcpus: 8 }), anc)).not.toThrow();
  });

  it("static rule: allowed lists may only narrow, host labels may not contradict", () => {
    const anc = [
      {
        path: "a",
        policy: pol({
          allowedNetworks: ["networks/x"],
          allowedCpus: [0, 1],
          allowedHostLabels: { zone: "1" },
        }),
      },
    ];
    expect(
      caught(() => checkFitsAncestors("a/b", pol({ allowedNetworks: ["networks/y"] }), anc)).metadata,
    ).toMatchObject({
      field: "policy.allowed_networks",
      network: "networks/y",
    });
    expect(caught(() => checkFitsAncestors("a/b", pol({ allowedCpus: [1, 2] }), anc)).metadata.cpu).toBe("2");
    expect(
      caught(() => checkFitsAncestors("a/b", pol({ allowedHostLabels: { zone: "2" } }), anc)).metadata.label,
    ).toBe("zone");
    expect(() =>
      checkFitsAncestors(
        "a/b",
        pol({
          allowedNetworks: ["networks/x"],
          allowedCpus: [1],
          allowedHostLabels: { zone: "1", ssd: "y" },
        }),
        anc,
      ),
    ).not.toThrow();
  });

  it("dynamic rule: checks every node on the path against its subtree usage, only for what is asked", () => {
    const chain = [
      { path: "a", policy: pol({ maxVcpus: 8, maxGpus: 0 }), usage: { ...ZERO_USAGE, vcpus: 6 } },
      { path: "a/b", policy: pol({ maxVcpus: 6 }), usage: { ...ZERO_USAGE } },
    ];
    const e = caught(() => checkCharge(chain, { ...ZERO_USAGE, vcpus: 4 }));
    expect(e.code).toBe("resource-exhausted");
    expect(e.message).toBe("nodes/a: max_vcpus would be exceeded: 6 used + 4 requested > 8");
    expect(() => checkCharge(chain, { ...ZERO_USAGE, vcpus: 2, memoryBytes: 1n << 40n })).not.toThrow();
    expect(caught(() => checkCharge(chain, { ...ZERO_USAGE, gpus: 1 })).metadata).toMatchObject({
      resource: "max_gpus",
      limit: "0",
    });
  });
});

import { describe, expect, it } from "vitest";
import { isolationRuleset, tableName } from "./nft.js";

describe("isolationRuleset", () => {
  it("replaces the agent's table atomically: own traffic and allowed peers accepted, other vme- bridges dropped", () => {
    const r = isolationRuleset("abc123", [
      { bridge: "vme-b", allowedBridges: [] },
      { bridge: "vme-a", allowedBridges: ["vme-b", "vme-b"] },
    ]);
    expect(r.split("\n").slice(0, 3)).toEqual([
      "add table inet vmenv-abc123",
      "delete table inet vmenv-abc123",
      "table inet vmenv-abc123 {",
    ]);
    expect(r).toContain('elements = { "vme-a", "vme-b" }');
    expect(r).toContain("ct state established,related accept");
    expect(r).toContain('iifname "vme-a" oifname "vme-b" accept');
    expect(r).not.toContain('iifname "vme-b" oifname "vme-a" accept');
    expect(r.match(/oifname "vme-b" accept/g)).toHaveLength(2); // a→b once, b→b
    // The drops come after every accept.
    expect(r.lastIndexOf("accept")).toBeLessThan(r.indexOf("drop"));
    expect(r).toContain('iifname @bridges oifname "vme-*" drop');
    expect(r).toContain('iifname "vme-*" oifname @bridges drop');
  });

  it("with no network, only removes the table", () => {
    expect(isolationRuleset("t", [])).toBe("add table inet vmenv-t\ndelete table inet vmenv-t\n");
    expect(tableName("t")).toBe("vmenv-t");
  });
});

import { describe, expect, it } from "vitest";
import { Sampler } from "./sampler.js";

describe("Sampler", () => {
  it("reuses a sample younger than maxAge and shares one read among concurrent callers", async () => {
    let t = 0;
    let reads = 0;
    const s = new Sampler(
      async () => ++reads,
      1000,
      () => t,
    );
    const [a, b] = await Promise.all([s.get(), s.get()]);
    expect([a.value, b.value, reads]).toEqual([1, 1, 1]);
    t = 999;
    expect((await s.get()).value).toBe(1);
    t = 1000;
    expect((await s.get()).value).toBe(2);
    expect((await s.get()).at).toBe(1000);
  });

  it("does not keep a failed read", async () => {
    let fail = true;
    const s = new Sampler(
      async () => {
        if (fail) throw new Error("proc gone");
        return "ok";
      },
      1000,
      () => 0,
    );
    await expect(s.get()).rejects.toThrow("proc gone");
    fail = false;
    expect((await s.get()).value).toBe("ok");
  });
});

/**
 * A process for crash tests: drives one "test.build" operation over a LevelDB store, acting on a "world"
 * of files, and SIGKILLs itself at crash point N (the coordinator's own mechanism).
 *
 *   node --conditions source --import tsx crash-fixture.ts <db dir> <world dir> start|resume <N>
 *
 * `start` starts the operation (request id "crash-test") and waits for it; `resume` resumes whatever
 * is unfinished and waits for that operation. Either prints the final record as one JSON line.
 */
import { appendFile, mkdir, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { openLevelStore } from "../../store/level.js";
import { OperationEngine } from "../engine.js";
import { buildKind, captureLogger, type World } from "./kinds.js";

const [dbDir, worldDir, mode, n] = process.argv.slice(2) as [string, string, string, string];
await mkdir(worldDir, { recursive: true });
const world: World = {
  has: (name) =>
    stat(join(worldDir, name)).then(
      () => true,
      () => false,
    ),
  async create(name) {
    await writeFile(join(worldDir, name), "");
    await appendFile(join(worldDir, "log"), `+${name}\n`);
  },
  async remove(name) {
    await rm(join(worldDir, name), { force: true });
    await appendFile(join(worldDir, "log"), `-${name}\n`);
  },
};
const store = await openLevelStore(dbDir);
const { logger, lines } = captureLogger();
const engine = new OperationEngine({
  store,
  clock: { now: () => Date.now() },
  logger,
  crashPoint: Number(n),
});
engine.register(buildKind(world));
let id: string;
if (mode === "start") {
  id = (
    await engine.start(
      "test.build",
      "environments/shop",
      { items: ["a", "b", "c"], env: "shop" },
      { requestId: "crash-test" },
    )
  ).id;
} else {
  await engine.resumeAll();
  id = (await engine.list({ requestId: "crash-test", pageSize: 1, pageToken: "" })).ops[0]?.id ?? "";
}
const done = await engine.wait(id, 30_000);
await engine.stop();
await store.close();
const points = lines.filter((l) => typeof l.crashPoint === "number").length;
process.stdout.write(`${JSON.stringify({ op: done, points })}\n`);

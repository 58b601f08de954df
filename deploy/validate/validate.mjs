// Renders kustomize directories with `kubectl kustomize` and validates every
// document against the Kubernetes and KEDA schemas (the JSON schemas that
// the npm packages kubernetes-models and @kubernetes-models/keda carry).
//
//   node validate.mjs DIR...                  # every document must be valid
//   node validate.mjs --expect-invalid DIR... # every document must be refused
//
// A document whose apiVersion/kind no package knows is an error, never a
// skip. `--expect-invalid` is the validator's own test: CI runs it on
// deploy/validate/broken, whose documents are each broken in one way, so a
// validator that stopped refusing anything fails the build.
// KUBECTL names the kubectl binary (default: kubectl on PATH).

import { execFileSync } from "node:child_process";
import * as kubernetes from "kubernetes-models";
import * as keda from "@kubernetes-models/keda";
import { parseAllDocuments } from "yaml";

/** Every model class of both packages, by "apiVersion kind". */
function modelClasses() {
  const classes = new Map();
  const seen = new Set();
  const walk = (value) => {
    if (value === null || seen.has(value)) return;
    if (typeof value === "function") {
      if (typeof value.apiVersion === "string" && typeof value.kind === "string") {
        classes.set(`${value.apiVersion} ${value.kind}`, value);
      }
      return;
    }
    if (typeof value !== "object") return;
    seen.add(value);
    for (const key of Object.keys(value)) walk(value[key]);
  };
  walk(kubernetes);
  walk(keda);
  return classes;
}

/** The YAML `kubectl kustomize dir` renders; exits when kubectl fails. */
function render(dir) {
  const kubectl = process.env.KUBECTL || "kubectl";
  try {
    return execFileSync(kubectl, ["kustomize", dir], {
      encoding: "utf8",
      stdio: ["ignore", "pipe", "pipe"],
    });
  } catch (error) {
    const why = error.code === "ENOENT" ? `${kubectl} not found` : (error.stderr || error.message);
    console.error(`FAIL ${dir}: kubectl kustomize failed: ${String(why).trim()}`);
    process.exit(1);
  }
}

/** Problems of one document (none when it is valid). */
function problems(document, classes) {
  if (document === null || typeof document !== "object" || Array.isArray(document)) {
    return ["not a mapping"];
  }
  const { apiVersion, kind } = document;
  const Model = classes.get(`${apiVersion} ${kind}`);
  if (!Model) return [`unknown apiVersion/kind: ${apiVersion} ${kind}`];
  if (!document.metadata?.name) return ["metadata.name is missing"];
  try {
    new Model(document).validate();
    return [];
  } catch (error) {
    return [String(error.message || error)];
  }
}

function main() {
  const args = process.argv.slice(2);
  const expectInvalid = args[0] === "--expect-invalid";
  const dirs = expectInvalid ? args.slice(1) : args;
  if (dirs.length === 0) {
    console.error("usage: node validate.mjs [--expect-invalid] KUSTOMIZE_DIR...");
    process.exit(2);
  }
  const classes = modelClasses();
  let failed = false;
  for (const dir of dirs) {
    const parsed = parseAllDocuments(render(dir));
    const documents = [];
    for (const doc of parsed) {
      if (doc.errors.length > 0) {
        console.error(`FAIL ${dir}: YAML: ${doc.errors.map((e) => e.message).join("; ")}`);
        failed = true;
        continue;
      }
      const value = doc.toJS();
      if (value !== null) documents.push(value);
    }
    if (documents.length === 0) {
      console.error(`FAIL ${dir}: rendered no document`);
      failed = true;
      continue;
    }
    let valid = 0;
    for (const document of documents) {
      const name = `${document?.kind ?? "?"}/${document?.metadata?.name ?? "?"}`;
      const found = problems(document, classes);
      if (expectInvalid) {
        if (found.length === 0) {
          console.error(`FAIL ${dir}: ${name} was accepted, but it is broken on purpose`);
          failed = true;
        } else {
          console.log(`  refused, as it should be: ${name}: ${found.join("; ")}`);
        }
      } else if (found.length > 0) {
        console.error(`FAIL ${dir}: ${name}: ${found.join("; ")}`);
        failed = true;
      } else {
        valid += 1;
      }
    }
    if (!expectInvalid) {
      console.log(`${dir}: ${valid} of ${documents.length} documents valid`);
    }
  }
  if (failed) process.exit(1);
}

main();

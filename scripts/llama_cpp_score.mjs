// Score a text with llama.cpp (through node-llama-cpp's prebuilt CPU binaries): the token ids
// of llama.cpp's own tokenizer and, at every position, the probability of the next token under
// the full next-token distribution (temperature 1, no top-k / top-p / min-p truncation).
//
//   node scripts/llama_cpp_score.mjs MODEL.gguf TEXT_FILE
//
// prints one JSON object {"token_ids": [...], "nll": [...], "mean_nll": x} in the layout of
// `shears score --json`. NODE_LLAMA_CPP_DIR names the folder whose node_modules holds
// node-llama-cpp@3.21.1 (ES modules ignore NODE_PATH); scripts/check_llama_cpp.py installs it
// and compares with Shears.
import {readFileSync} from "node:fs";
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const dir = process.env.NODE_LLAMA_CPP_DIR;
const lib = dir
    ? pathToFileURL(join(dir, "node_modules", "node-llama-cpp", "dist", "index.js")).href
    : "node-llama-cpp";
const {getLlama, LlamaLogLevel} = await import(lib);

const [modelPath, textPath] = process.argv.slice(2);
if (!modelPath || !textPath) {
    console.error("usage: node llama_cpp_score.mjs MODEL.gguf TEXT_FILE");
    process.exit(2);
}
const text = readFileSync(textPath, "utf8");
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath});
// As Shears' `score`: the model's default special tokens (BOS where the model adds one),
// special-token text in the input tokenized as text.
const ids = model.tokenize(text, false);
const bos = model.tokens.bos;
const addBos = model.tokens.shouldPrependBosToken && bos != null;
const tokens = addBos ? [bos, ...ids] : ids;
const context = await model.createContext({contextSize: Math.max(tokens.length + 8, 64), batchSize: tokens.length + 8});
const sequence = context.getSequence();
const generateNext = {probabilities: true, options: {temperature: 1, topK: 0, topP: 1, minP: 0}};
const input = tokens.map((t, i) => (i + 1 < tokens.length ? [t, {generateNext}] : t));
const out = await sequence.controlledEvaluate(input);
const nll = [];
for (let i = 0; i + 1 < tokens.length; i++) {
    const p = out[i]?.next?.probabilities?.get(tokens[i + 1]);
    if (p == null || !(p > 0)) {
        console.error(`no probability for token ${tokens[i + 1]} at position ${i}`);
        process.exit(1);
    }
    nll.push(-Math.log(p));
}
const mean = nll.reduce((a, b) => a + b, 0) / nll.length;
console.log(JSON.stringify({token_ids: tokens, nll, mean_nll: mean}));
await context.dispose();
await model.dispose();
await llama.dispose();

// The console's only script (served from 'self': the Content-Security-Policy allows no inline script).
// 1. Verify a report's Ed25519 signature in the browser against the service's published keys: the one a
// request page shows, or files someone was handed. 2. Poll the progress of running jobs. 3. Print the page.
"use strict";

function bytesOfBase64(text) {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function fetchOk(url) {
  const answer = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (!answer.ok) {
    throw new Error(`${url} answered ${answer.status}`);
  }
  return answer;
}

// Returns {verified, text}. The report is verified only when: the signature document names a key the
// service lists, that key's fingerprint is what it claims, the report names the same key, its bytes hash
// to the signed SHA-256, and the Ed25519 signature over those exact bytes is valid.
async function verifyReport(reportBytes, signature, keys, signedAt) {
  const digest = hex(await crypto.subtle.digest("SHA-256", reportBytes));
  const key = keys.find((k) => k.key_id === signature.key_id);
  if (signature.algorithm !== "Ed25519" || !key) {
    return { verified: false, text: `NOT verified: the signature names key ${signature.key_id}, which the service does not list.` };
  }
  const raw = bytesOfBase64(key.public_key);
  const fingerprint = hex(await crypto.subtle.digest("SHA-256", raw));
  const publicKey = await crypto.subtle.importKey("raw", raw, { name: "Ed25519" }, false, ["verify"]);
  const valid = await crypto.subtle.verify({ name: "Ed25519" }, publicKey, bytesOfBase64(signature.signature), reportBytes);
  let named = null;
  try {
    named = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(reportBytes)).signing?.key_id;
  } catch (error) {
    named = null;
  }
  const problems = [];
  if (!valid) problems.push("the signature does not match the report's bytes (changed after signing, or signed by another key)");
  if (digest !== signature.signed_sha256) problems.push(`the report's SHA-256 is ${digest}, not the signed ${signature.signed_sha256}`);
  if (fingerprint !== key.fingerprint_sha256 || !fingerprint.startsWith(key.key_id)) problems.push("the listed key does not match its fingerprint");
  if (named !== signature.key_id) problems.push("the report does not name the key that signed it");
  if (problems.length) {
    return { verified: false, text: `NOT verified: ${problems.join("; ")}.` };
  }
  const when = signedAt ? ` on ${signedAt.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", " UTC")}` : "";
  return {
    verified: true,
    text: `Verified: signed by key ${key.key_id} (fingerprint ${fingerprint})${when}. The report's SHA-256 is ${digest}.`,
  };
}

function setupVerification() {
  const panel = document.getElementById("verification");
  const button = document.getElementById("verify");
  const result = document.getElementById("verify-result");
  if (!panel || !button || !result) return;
  button.addEventListener("click", async () => {
    button.disabled = true;
    result.className = "verify-result";
    result.textContent = "Checking the signature…";
    try {
      // The report first: its first download signs it, and the signature is read after.
      const report = await fetchOk(panel.dataset.report).then((a) => a.arrayBuffer());
      const signatureAnswer = await fetchOk(panel.dataset.signature);
      const keys = await fetchOk(panel.dataset.keys).then((a) => a.json());
      const signature = await signatureAnswer.json();
      show(result, await verifyReport(report, signature, keys.items, signatureAnswer.headers.get("Lethe-Signed-At")));
    } catch (error) {
      show(result, { verified: false, text: `NOT verified: the check could not run (${error.message}).` });
    } finally {
      button.disabled = false;
    }
  });
}

function show(result, outcome) {
  result.textContent = outcome.text;
  result.className = `verify-result ${outcome.verified ? "ok" : "problem"}`;
  result.dataset.verified = String(outcome.verified);
}

// A report and signature someone was handed, read from files: nothing leaves the browser but the key list's fetch.
function setupFileVerification() {
  const form = document.getElementById("verify-files");
  const result = document.getElementById("verify-result");
  if (!form || !result) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    result.className = "verify-result";
    result.textContent = "Checking the signature…";
    try {
      const report = await document.getElementById("report-file").files[0].arrayBuffer();
      const signature = JSON.parse(await document.getElementById("signature-file").files[0].text());
      const keys = await fetchOk(form.dataset.keys).then((a) => a.json());
      show(result, await verifyReport(report, signature, keys.items, null));
    } catch (error) {
      show(result, { verified: false, text: `NOT verified: the files could not be checked (${error.message}).` });
    }
  });
}

function setupProgress() {
  for (const job of document.querySelectorAll("[data-progress]")) {
    const bar = job.querySelector("progress");
    const status = job.querySelector(".job-status");
    const poll = async () => {
      try {
        const answer = await fetchOk(job.dataset.progress).then((a) => a.json());
        bar.max = answer.max;
        bar.value = answer.value;
        status.textContent = answer.text;
        if (!answer.done) setTimeout(poll, 2000);
      } catch (error) {
        status.textContent = `progress unavailable (${error.message})`;
      }
    };
    setTimeout(poll, 2000);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupVerification();
  setupFileVerification();
  setupProgress();
  document.getElementById("print")?.addEventListener("click", () => window.print());
});

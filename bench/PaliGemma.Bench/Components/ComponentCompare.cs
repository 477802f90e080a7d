using System.Diagnostics;
using Microsoft.ML.OnnxRuntime;
using PaliGemma.Bench.Onnx;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.Bench.Components;

/// <summary>
/// <c>components [checkpoint] [--vision-layers N] [--text-layers N] [--prompt T] [--runs R]</c>: exports the SigLIP encoder
/// + projector and N Gemma decoder layers (+ final norm) from the checkpoint's safetensors to ONNX (fp32: bf16 weights
/// widened, which is what ORT would run), runs them and our runtime in this process on the same inputs, checks the outputs
/// agree and prints the times. The Gemma graph takes the KV cache as inputs (past_k/v per layer, free length) and
/// returns the new one, so the same session runs the T-token prefill and one decode step.
/// </summary>
internal static class ComponentCompare
{
    public static int Run(string[] args)
    {
        string checkpointDir = "/tmp/pg3b";
        int visionLayers = -1, textLayers = 2, prompt = 256 + 16, runs = 3;
        for (int i = 0; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--vision-layers": visionLayers = int.Parse(args[++i]); break;
                case "--text-layers": textLayers = int.Parse(args[++i]); break;
                case "--prompt": prompt = int.Parse(args[++i]); break;
                case "--runs": runs = int.Parse(args[++i]); break;
                default: checkpointDir = args[i]; break;
            }
        }
        KernelThreading.MaxThreads = OrtRunner.Threads;
        var config = PaliGemmaConfig.Load(Path.Combine(checkpointDir, "config.json"));
        if (config.Text.IsGemma2)
            throw new NotSupportedException("the Gemma export covers Gemma 1 layers (PaliGemma 1) only");
        using var checkpoint = SafetensorsCheckpoint.Open(checkpointDir);
        int fullVision = config.Vision.NumHiddenLayers, fullText = config.Text.NumHiddenLayers;
        if (visionLayers < 0) visionLayers = fullVision;
        Console.WriteLine($"# components of {checkpointDir}: ours vs ONNX Runtime, {OrtRunner.Threads} threads each, load average {BenchStats.LoadAverage()}");
        Console.WriteLine("# ORT runs fp32 graphs (the checkpoint's bf16 weights widened exactly); ours reads the bf16 weights in place");
        Console.WriteLine($"| {"component",-44} | {"ours ms",10} | {"ORT ms",10} | {"ours/ORT",8} | {"max rel diff",12} |");
        Console.WriteLine($"|{new string('-', 46)}|{new string('-', 12)}|{new string('-', 12)}|{new string('-', 10)}|{new string('-', 14)}|");
        bool ok = CompareVision(config, checkpoint, visionLayers, fullVision, runs);
        ok &= CompareText(config, checkpoint, textLayers, fullText, prompt, runs);
        Console.WriteLine($"# load average after: {BenchStats.LoadAverage()}");
        return ok ? 0 : 1;
    }

    private static bool CompareVision(PaliGemmaConfig config, SafetensorsCheckpoint checkpoint, int layers, int fullLayers, int runs)
    {
        var vision = config.Vision with { NumHiddenLayers = layers };
        int s = vision.ImageSize, d = vision.HiddenSize, tokens = vision.PatchesPerSide * vision.PatchesPerSide;
        var tower = new SigLipVisionTower(vision, checkpoint);
        var projector = new MultiModalProjector(d, config.ProjectionDim, checkpoint);
        float[] pixels = Uniform(3 * s * s, 31, 1f);
        float[] states = new float[tokens * d], ours = new float[tokens * config.ProjectionDim];
        void RunOurs()
        {
            tower.Encode(pixels, 1, states);
            projector.Forward(states, tokens, ours);
        }

        using var session = OrtRunner.OpenSession(ExportVision(vision, config.ProjectionDim, checkpoint));
        using var input = OrtValue.CreateTensorValueFromMemory(pixels, [1, 3, s, s]);
        float[] ort = [];
        void RunOrt()
        {
            using var outputs = session.Run(new RunOptions(), ["pixel_values"], [input], ["image_features"]);
            ort = outputs[0].GetTensorDataAsSpan<float>().ToArray();
        }
        return Report($"SigLIP {layers}/{fullLayers} layers + projector, 1 image", RunOurs, RunOrt, () => (ours, ort), runs,
            layers == fullLayers ? 1 : (double)fullLayers / layers);
    }

    private static OnnxModelBuilder ExportVision(VisionConfig vision, int projectionDim, SafetensorsCheckpoint checkpoint)
    {
        const string P = "vision_tower.vision_model.";
        var model = new OnnxModelBuilder { Opset = 20, ExternalThreshold = 1 << 20 };
        var g = new GraphOps(model);
        int s = vision.ImageSize, d = vision.HiddenSize, p = vision.PatchSize, heads = vision.NumAttentionHeads, hd = vision.HeadDim;
        int tokens = vision.PatchesPerSide * vision.PatchesPerSide;
        float eps = vision.LayerNormEps;
        TensorData T(string name) => checkpoint.Get(P + name);
        string LayerNorm(string x, string prefix) =>
            g.Op("LayerNormalization", [x, g.Weight(T(prefix + ".weight")), g.Weight(T(prefix + ".bias"))],
                OnnxAttribute.Of("axis", -1L), OnnxAttribute.Of("epsilon", eps));

        model.Input("pixel_values", 1, 3, s, s);
        string conv = g.Op("Conv", ["pixel_values", g.Weight(T("embeddings.patch_embedding.weight")), g.Weight(T("embeddings.patch_embedding.bias"))],
            OnnxAttribute.Of("kernel_shape", (long)p, p), OnnxAttribute.Of("strides", (long)p, p));
        string h = g.Add(g.Transpose(g.Reshape(conv, d, tokens), 1, 0), g.Weight(T("embeddings.position_embedding.weight")));
        for (int i = 0; i < vision.NumHiddenLayers; i++)
        {
            string l = $"encoder.layers.{i}.";
            string x = LayerNorm(h, l + "layer_norm1");
            string Proj(string name, string source) => g.Linear(source, T(l + name + ".weight"), T(l + name + ".bias"));
            string q = g.Transpose(g.Reshape(Proj("self_attn.q_proj", x), tokens, heads, hd), 1, 0, 2);
            string kT = g.Transpose(g.Reshape(Proj("self_attn.k_proj", x), tokens, heads, hd), 1, 2, 0);
            string v = g.Transpose(g.Reshape(Proj("self_attn.v_proj", x), tokens, heads, hd), 1, 0, 2);
            string a = g.Reshape(g.Transpose(g.Attention(q, kT, v, 1f / MathF.Sqrt(hd)), 1, 0, 2), tokens, d);
            h = g.Add(h, Proj("self_attn.out_proj", a));
            x = LayerNorm(h, l + "layer_norm2");
            h = g.Add(h, Proj("mlp.fc2", g.GeluTanh(Proj("mlp.fc1", x))));
        }
        h = LayerNorm(h, "post_layernorm");
        string features = g.Linear(h, checkpoint.Require("multi_modal_projector.linear.weight", [projectionDim, d]),
            checkpoint.Require("multi_modal_projector.linear.bias", [projectionDim]));
        model.Node("Identity", [features], ["image_features"]);
        model.Output("image_features", tokens, projectionDim);
        return model;
    }

    private static bool CompareText(PaliGemmaConfig config, SafetensorsCheckpoint checkpoint, int layers, int fullLayers, int prompt, int runs)
    {
        var text = config.Text with { NumHiddenLayers = layers };
        int h = text.HiddenSize, kvWidth = text.NumKeyValueHeads * text.HeadDim, hd = text.HeadDim;
        var decoder = new GemmaDecoder(text, checkpoint);
        float[] promptHidden = Uniform(prompt * h, 41, 1f), stepHidden = Uniform(h, 42, 1f);
        int[] promptPositions = Enumerable.Range(0, prompt).ToArray();

        using var session = OrtRunner.OpenSession(ExportText(text, checkpoint));
        (float[] Cos, float[] Sin) promptRope = RopeTables(promptPositions, hd, text.RopeTheta);

        // Prefill: ours into a fresh cache each run; ORT with empty past.
        float[] ours = [], ort = [];
        KvCache? cache = null;
        void OursPrefill()
        {
            cache = decoder.CreateCache(1, prompt + 1);
            Array.Fill(cache.Valid, (byte)1);   // every position is a real token (no padding)
            ours = (float[])promptHidden.Clone();
            decoder.Forward(ours, prompt, promptPositions, cache, prefixLength: prompt);
        }
        List<float[]> present = [];
        void OrtPrefill()
        {
            var empty = Enumerable.Range(0, 2 * layers).Select(_ => (Array.Empty<float>(), 0)).ToList();
            (ort, present) = RunText(session, promptHidden, prompt, promptRope, empty, layers, kvWidth);
        }
        double scale = layers == fullLayers ? 1 : (double)fullLayers / layers;
        bool ok = Report($"Gemma {layers}/{fullLayers} layers + norm, prefill {prompt}", OursPrefill, OrtPrefill, () => (ours, ort), runs, scale);

        // Decode steps after the prompt: each side appends to its own cache (ours: the KvCache; ORT: its previous present
        // K/V fed back as past), so step r is at position prompt + r on both; the check compares the first step.
        int decodeRuns = Math.Max(runs, 5);
        cache = decoder.CreateCache(1, prompt + (decodeRuns + 1) * DecodeBurst + 2);
        Array.Fill(cache.Valid, (byte)1);
        ours = (float[])promptHidden.Clone();
        decoder.Forward(ours, prompt, promptPositions, cache, prefixLength: prompt);
        OrtPrefill();
        KvCache prefilled = cache;
        var past = present.Select(t => (t, prompt)).ToList();
        float[] oursStep = [], ortStep = [];
        void OursDecode()
        {
            oursStep = (float[])stepHidden.Clone();
            decoder.Forward(oursStep, 1, [prefilled.Length], prefilled, prefixLength: prompt);
        }
        void OrtDecode()
        {
            int position = past[0].Item2;
            (ortStep, var next) = RunText(session, stepHidden, 1, RopeTables([position], hd, text.RopeTheta), past, layers, kvWidth);
            past = next.Select(t => (t, position + 1)).ToList();
        }
        ok &= Report($"Gemma {layers}/{fullLayers} layers + norm, decode step @ {prompt}+", OursDecode, OrtDecode, () => (oursStep, ortStep), decodeRuns, scale, DecodeBurst);
        return ok;
    }

    private static (float[] Hidden, List<float[]> Present) RunText(InferenceSession session, float[] hidden, int tokens,
        (float[] Cos, float[] Sin) rope, List<(float[] Data, int Length)> past, int layers, int kvWidth)
    {
        var names = new List<string> { "hidden", "cos", "sin" };
        var values = new List<OrtValue>
        {
            OrtValue.CreateTensorValueFromMemory(hidden, [tokens, hidden.Length / tokens]),
            OrtValue.CreateTensorValueFromMemory(rope.Cos, [tokens, rope.Cos.Length / tokens]),
            OrtValue.CreateTensorValueFromMemory(rope.Sin, [tokens, rope.Sin.Length / tokens]),
        };
        var outputNames = new List<string> { "output" };
        for (int i = 0; i < layers; i++)
        {
            names.Add($"past_k_{i}"); values.Add(OrtValue.CreateTensorValueFromMemory(past[2 * i].Data, [past[2 * i].Length, kvWidth]));
            names.Add($"past_v_{i}"); values.Add(OrtValue.CreateTensorValueFromMemory(past[2 * i + 1].Data, [past[2 * i + 1].Length, kvWidth]));
            outputNames.Add($"present_k_{i}");
            outputNames.Add($"present_v_{i}");
        }
        try
        {
            using var runOptions = new RunOptions();
            using var outputs = session.Run(runOptions, names, values, outputNames);
            float[] result = outputs[0].GetTensorDataAsSpan<float>().ToArray();
            var present = outputs.Skip(1).Select(o => o.GetTensorDataAsSpan<float>().ToArray()).ToList();
            return (result, present);
        }
        finally
        {
            foreach (var v in values) v.Dispose();
        }
    }

    /// <summary>Gemma 1 layers + final norm; inputs hidden [T, H], cos/sin [T, headDim], past_k/v_i [P, kvWidth]; outputs output and present_k/v_i.</summary>
    internal static OnnxModelBuilder ExportText(TextConfig text, SafetensorsCheckpoint checkpoint)
    {
        const string P = "language_model.model.";
        const long Tokens = -1, Past = -2, Total = -3;
        var model = new OnnxModelBuilder { Opset = 20, ExternalThreshold = 1 << 20 };
        var g = new GraphOps(model);
        int h = text.HiddenSize, heads = text.NumAttentionHeads, kvHeads = text.NumKeyValueHeads, hd = text.HeadDim;
        if (kvHeads != 1)
            throw new NotSupportedException($"the Gemma export covers multi-query attention (1 kv head), not {kvHeads}");
        TensorData T(string name) => checkpoint.Get(P + name);
        string RmsNorm(string x, string name) =>   // Gemma scales by (1 + w): folded into the initializer
            g.Op("SimplifiedLayerNormalization", [x, g.Weight(T(name), w => 1f + w)],
                OnnxAttribute.Of("axis", -1L), OnnxAttribute.Of("epsilon", text.RmsNormEps));
        string half0 = g.Shape(0), halfEnd = g.Shape(hd / 2), fullEnd = g.Shape(hd), lastAxis = g.Shape(-1);
        string Rope(string x)   // rotate-half: x cos + concat(-x2, x1) sin
        {
            string x1 = g.Op("Slice", [x, half0, halfEnd, lastAxis]);
            string x2 = g.Op("Slice", [x, halfEnd, fullEnd, lastAxis]);
            string rotated = g.Op("Concat", [g.Op("Neg", [x2]), x1], OnnxAttribute.Of("axis", -1L));
            return g.Add(g.Mul(x, "cos"), g.Mul(rotated, "sin"));
        }

        model.Input("hidden", Tokens, h);
        model.Input("cos", Tokens, hd);
        model.Input("sin", Tokens, hd);
        string hidden = "hidden";
        for (int i = 0; i < text.NumHiddenLayers; i++)
        {
            string l = $"layers.{i}.";
            model.Input($"past_k_{i}", Past, hd);
            model.Input($"past_v_{i}", Past, hd);
            string x = RmsNorm(hidden, l + "input_layernorm.weight");
            string q = Rope(g.Transpose(g.Reshape(g.Linear(x, T(l + "self_attn.q_proj.weight")), -1, heads, hd), 1, 0, 2));   // [heads, T, hd]
            string k = Rope(g.Linear(x, T(l + "self_attn.k_proj.weight")));                                                   // [T, hd]
            string v = g.Linear(x, T(l + "self_attn.v_proj.weight"));
            model.Node("Concat", [$"past_k_{i}", k], [$"present_k_{i}"], OnnxAttribute.Of("axis", 0L));
            model.Node("Concat", [$"past_v_{i}", v], [$"present_v_{i}"], OnnxAttribute.Of("axis", 0L));
            model.Output($"present_k_{i}", Total, hd);
            model.Output($"present_v_{i}", Total, hd);
            // Prefill is all prefix (bidirectional) and one decode step sees every key, so no mask is needed.
            string a = g.Attention(q, g.Transpose($"present_k_{i}", 1, 0), $"present_v_{i}", text.AttentionScale);
            a = g.Reshape(g.Transpose(a, 1, 0, 2), -1, heads * hd);
            hidden = g.Add(hidden, g.Linear(a, T(l + "self_attn.o_proj.weight")));
            x = RmsNorm(hidden, l + "post_attention_layernorm.weight");
            string gate = g.GeluTanh(g.Linear(x, T(l + "mlp.gate_proj.weight")));
            string mlp = g.Mul(gate, g.Linear(x, T(l + "mlp.up_proj.weight")));
            hidden = g.Add(hidden, g.Linear(mlp, T(l + "mlp.down_proj.weight")));
        }
        model.Node("Identity", [RmsNorm(hidden, "norm.weight")], ["output"]);
        model.Output("output", Tokens, h);
        return model;
    }

    /// <summary>cos/sin [positions, headDim] in the rotate-half layout (each frequency twice), computed in double.</summary>
    private static (float[] Cos, float[] Sin) RopeTables(int[] positions, int headDim, float theta)
    {
        int half = headDim / 2;
        float[] cos = new float[positions.Length * headDim], sin = new float[positions.Length * headDim];
        for (int t = 0; t < positions.Length; t++)
            for (int i = 0; i < half; i++)
            {
                double angle = positions[t] * Math.Pow(theta, -2.0 * i / headDim);
                cos[t * headDim + i] = cos[t * headDim + half + i] = (float)Math.Cos(angle);
                sin[t * headDim + i] = sin[t * headDim + half + i] = (float)Math.Sin(angle);
            }
        return (cos, sin);
    }

    // Decode steps are timed in bursts of consecutive steps, as generation runs them: a lone ~15 ms step timed after the
    // side-switch pause also paid for waking the sleeping worker threads (ours and ORT's), a cost generation never sees.
    private const int DecodeBurst = 4;

    /// <summary>Checks that both sides agree, then times them alternately; a sample is the mean of <paramref name="burst"/> back-to-back calls.</summary>
    private static bool Report(string name, Action ours, Action ort, Func<(float[] Ours, float[] Ort)> outputs, int runs, double scale, int burst = 1)
    {
        ours();
        ort();
        var (a, b) = outputs();
        double maxDiff = 0, maxRef = 0;
        bool finite = a.Length == b.Length;
        for (int i = 0; finite && i < a.Length; i++)
        {
            finite = float.IsFinite(a[i]) && float.IsFinite(b[i]);
            maxDiff = Math.Max(maxDiff, Math.Abs(a[i] - b[i]));
            maxRef = Math.Max(maxRef, Math.Abs(b[i]));
        }
        double rel = maxRef == 0 ? maxDiff : maxDiff / maxRef;
        bool agree = finite && rel <= Pairs.KernelPair.Tolerance;
        var oursMs = new List<double>();
        var ortMs = new List<double>();
        for (int r = 0; r < runs; r++)
        {
            // ORT's intra-op threads spin for tens of ms after Run returns; a call timed right after the other side's
            // would share the 2 cores with them (see Compare.SideSwitchPauseMs), so each side starts after a pause.
            Thread.Sleep(Compare.SideSwitchPauseMs);
            oursMs.Add(Time(ours, burst));
            Thread.Sleep(Compare.SideSwitchPauseMs);
            ortMs.Add(Time(ort, burst));
        }
        double om = BenchStats.Median(oursMs), rm = BenchStats.Median(ortMs);
        string scaled = scale == 1 ? "" : $" (x{scale:0.##} for all layers: ours {om * scale:F0} ms, ORT {rm * scale:F0} ms, layers only)";
        Console.WriteLine($"| {name,-44} | {om,10:F1} | {rm,10:F1} | {om / rm,8:F2} | {rel,12:0.00e+0} |{(agree ? "" : " DISAGREE")}{scaled}");
        return agree;
    }

    private static float[] Uniform(int count, int seed, float scale)
    {
        var random = new Random(seed);
        var values = new float[count];
        for (int i = 0; i < count; i++)
            values[i] = (random.NextSingle() * 2f - 1f) * scale;
        return values;
    }

    private static double Time(Action action, int calls)
    {
        long start = Stopwatch.GetTimestamp();
        for (int i = 0; i < calls; i++)
            action();
        return Stopwatch.GetElapsedTime(start).TotalMilliseconds / calls;
    }


}

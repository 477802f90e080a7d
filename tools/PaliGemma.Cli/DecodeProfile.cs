using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using PaliGemma.CpuOnly.Model;

namespace PaliGemma.Cli;

/// <summary>
/// <c>bench --profile</c>: where one decode step's time goes. The decoder's operations are timed on the
/// <see cref="ProfilingBackend"/>; what runs outside it (the LM head on the CPU backend, the embedding lookup, argmax) is
/// the rest of the step, and the LM head product is then timed alone.
/// </summary>
internal sealed class DecodeProfile
{
    private readonly List<(string Name, double CallsPerToken, double SecondsPerToken, double? GBps)> _rows = [];
    private readonly int _steps;
    private readonly double _stepSeconds, _outsideSeconds, _lmHeadSeconds, _lmHeadBytes;

    private DecodeProfile(int steps, double stepSeconds, double outsideSeconds, double lmHeadSeconds, double lmHeadBytes)
    {
        _steps = steps;
        _stepSeconds = stepSeconds;
        _outsideSeconds = outsideSeconds;
        _lmHeadSeconds = lmHeadSeconds;
        _lmHeadBytes = lmHeadBytes;
    }

    public static DecodeProfile Of(ProfilingBackend profiler, PaliGemmaModel model, int steps, double stepsSeconds)
    {
        steps = Math.Max(steps, 1);
        double inside = 0, matrixBytesPerToken = 0;
        var rows = new List<(string, double, double, double?)>();
        foreach (var s in profiler.Stats)
        {
            double perToken = s.Seconds / steps;
            inside += perToken;
            double? gbps = s.BytesPerCall > 0 && s.Seconds > 0 ? s.BytesPerCall * (double)s.Calls / s.Seconds / 1e9 : null;
            if (s.BytesPerCall > 0) matrixBytesPerToken += s.BytesPerCall * (double)s.Calls / steps;
            rows.Add((s.Name, s.Calls / (double)steps, perToken, gbps));
        }

        // The LM head alone, on a final-normed hidden state of ordinary size.
        int hidden = model.Config.Text.HiddenSize;
        var state = new float[hidden];
        var random = new Random(5);
        for (int i = 0; i < hidden; i++) state[i] = (float)(random.NextDouble() * 2 - 1);
        var logits = new float[model.Config.Text.VocabSize];
        model.Decoder.Logits(state, 1, logits);
        var times = new double[5];
        for (int i = 0; i < times.Length; i++)
        {
            long start = Stopwatch.GetTimestamp();
            model.Decoder.Logits(state, 1, logits);
            times[i] = Stopwatch.GetElapsedTime(start).TotalSeconds;
        }
        Array.Sort(times);
        double lmHeadBytes = Math.Max(0, model.Decoder.DecodeWeightBytesPerToken() - matrixBytesPerToken);

        double step = stepsSeconds / steps;
        var profile = new DecodeProfile(steps, step, step - inside, times[times.Length / 2], lmHeadBytes);
        profile._rows.AddRange(rows);
        return profile;
    }

    public void WriteText(TextWriter o)
    {
        var c = CultureInfo.InvariantCulture;
        o.WriteLine(string.Create(c, $"decode profile: ms per token, mean of {_steps} steps (the first step of each run left out); GB/s = weight bytes streamed / time"));
        foreach (var (name, calls, seconds, gbps) in _rows)
            o.WriteLine(string.Create(c, $"  {name,-26} {calls,6:F0} calls {seconds * 1000,9:F2} ms {100 * seconds / _stepSeconds,5:F1}%{(gbps is double g ? $" {g,7:F1} GB/s" : "")}"));
        o.WriteLine(string.Create(c, $"  {"outside the backend",-26} {"",12} {_outsideSeconds * 1000,9:F2} ms {100 * _outsideSeconds / _stepSeconds,5:F1}%  (LM head, embedding, argmax)"));
        o.WriteLine(string.Create(c, $"  {"  LM head alone",-26} {"",12} {_lmHeadSeconds * 1000,9:F2} ms {"",6} {_lmHeadBytes / _lmHeadSeconds / 1e9,7:F1} GB/s  (median of 5 calls)"));
        o.WriteLine(string.Create(c, $"  {"step",-26} {"",12} {_stepSeconds * 1000,9:F2} ms"));
    }

    public void WriteJson(Utf8JsonWriter w)
    {
        w.WriteStartObject("decode_profile");
        w.WriteNumber("steps", _steps);
        w.WriteNumber("step_s", _stepSeconds);
        w.WriteNumber("outside_backend_s_per_token", _outsideSeconds);
        w.WriteNumber("lm_head_alone_s", _lmHeadSeconds);
        w.WriteNumber("lm_head_bytes", _lmHeadBytes);
        w.WriteStartArray("operations");
        foreach (var (name, calls, seconds, gbps) in _rows)
        {
            w.WriteStartObject();
            w.WriteString("name", name);
            w.WriteNumber("calls_per_token", calls);
            w.WriteNumber("s_per_token", seconds);
            if (gbps is double g) w.WriteNumber("weight_gb_per_s", g);
            w.WriteEndObject();
        }
        w.WriteEndArray();
        w.WriteEndObject();
    }
}

using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model.Diagnostics;

/// <summary>Sizes that put benchmark timings in context.</summary>
public static class ModelFootprint
{
    /// <summary>
    /// Bytes of weights one decode step must stream from memory: every decoder matrix (q, k, v, o, gate, up, down of each
    /// layer) and the LM head (the tied embedding), in their stored dtype. Norm weights and biases are left out: they are
    /// copied to small fp32 arrays at load and stay in cache.
    /// </summary>
    public static long DecodeWeightBytesPerToken(SafetensorsCheckpoint checkpoint, TextConfig config)
    {
        ArgumentNullException.ThrowIfNull(checkpoint);
        ArgumentNullException.ThrowIfNull(config);
        const string prefix = "language_model.model.";
        long total = checkpoint.Get(prefix + "embed_tokens.weight").ByteLength;
        string[] matrices = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];
        for (int layer = 0; layer < config.NumHiddenLayers; layer++)
            foreach (string matrix in matrices)
                total += checkpoint.Get($"{prefix}layers.{layer}.{matrix}.weight").ByteLength;
        return total;
    }

    /// <summary>Opens the weights in <paramref name="modelDirectory"/> just to add up <see cref="DecodeWeightBytesPerToken(SafetensorsCheckpoint, TextConfig)"/>.</summary>
    public static long DecodeWeightBytesPerToken(string modelDirectory, TextConfig config)
    {
        using var checkpoint = SafetensorsCheckpoint.Open(modelDirectory);
        return DecodeWeightBytesPerToken(checkpoint, config);
    }
}

/// <summary>Process and host readings from Linux /proc; null where /proc is not available.</summary>
public static class ProcessStats
{
    /// <summary>
    /// Peak resident set size of this process in bytes (Linux <c>VmHWM</c>: mapped weight pages that were touched count too).
    /// </summary>
    public static long? PeakResidentBytes() => ReadStatusKilobytes("VmHWM:");

    /// <summary>Current resident set size in bytes (Linux <c>VmRSS</c>).</summary>
    public static long? ResidentBytes() => ReadStatusKilobytes("VmRSS:");

    /// <summary>The host's 1-minute load average (/proc/loadavg): above the core count, other work is competing for the CPUs.</summary>
    public static double? LoadAverage()
    {
        const string path = "/proc/loadavg";
        if (!File.Exists(path)) return null;
        string text = File.ReadAllText(path);
        int space = text.IndexOf(' ');
        return double.TryParse(space > 0 ? text[..space] : text, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out double load) ? load : null;
    }

    private static long? ReadStatusKilobytes(string key)
    {
        const string path = "/proc/self/status";
        if (!File.Exists(path)) return null;
        foreach (string line in File.ReadLines(path))
        {
            if (!line.StartsWith(key, StringComparison.Ordinal)) continue;
            var value = line.AsSpan(key.Length).Trim();
            if (value.EndsWith("kB", StringComparison.Ordinal)) value = value[..^2].TrimEnd();
            return long.TryParse(value, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out long kb) ? kb * 1024 : null;
        }
        return null;
    }
}

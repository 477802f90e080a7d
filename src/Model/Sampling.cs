using System.Numerics.Tensors;

namespace PaliGemma.CpuOnly.Model;

/// <summary>How the next token is chosen. Greedy (argmax) unless <see cref="Temperature"/> is above zero.</summary>
public sealed record SamplingOptions
{
    /// <summary>0 = greedy. Above 0: logits are divided by it and a token is sampled.</summary>
    public float Temperature { get; init; }
    /// <summary>Keep only the k most likely tokens when sampling; 0 = off.</summary>
    public int TopK { get; init; }
    /// <summary>Keep the smallest set of tokens whose probability reaches p when sampling; 1 = off.</summary>
    public float TopP { get; init; } = 1f;
    /// <summary>Seed of the sampler; the same seed, prompt and options give the same tokens.</summary>
    public ulong Seed { get; init; }

    public bool IsGreedy => Temperature <= 0f;

    public void Validate()
    {
        if (float.IsNaN(Temperature) || Temperature < 0f) throw new ArgumentOutOfRangeException(nameof(Temperature), Temperature, "temperature must be >= 0 (0 = greedy)");
        if (TopK < 0) throw new ArgumentOutOfRangeException(nameof(TopK), TopK, "top-k must be >= 0 (0 = off)");
        if (!(TopP > 0f && TopP <= 1f)) throw new ArgumentOutOfRangeException(nameof(TopP), TopP, "top-p must be in (0, 1]");
    }
}

/// <summary>
/// Picks tokens from logits: argmax, or temperature → top-k → top-p → sample (the order transformers applies its warpers in).
/// Holds its own scratch and a deterministic random generator (one per sequence).
/// </summary>
public sealed class TokenSampler
{
    private readonly SamplingOptions _options;
    private readonly Random _random;
    private float[] _probabilities = [];
    private int[] _order = [];
    private double[] _weights = [];

    public TokenSampler(SamplingOptions options)
    {
        options.Validate();
        _options = options;
        _random = new Random(unchecked((int)(options.Seed ^ (options.Seed >> 32))));
    }

    public int Next(ReadOnlySpan<float> logits)
    {
        if (_options.IsGreedy) return ArgMax(logits);

        int n = logits.Length;
        if (_probabilities.Length != n)
        {
            _probabilities = new float[n];
            _order = new int[n];
            _weights = new double[n];
        }
        var p = _probabilities.AsSpan(0, n);
        TensorPrimitives.Divide(logits, _options.Temperature, p);

        // Candidates sorted by logit, most likely first (ties by id, as a stable sort keeps them).
        var order = _order.AsSpan(0, n);
        for (int i = 0; i < n; i++) order[i] = i;
        order.Sort(new MostLikelyFirst(_probabilities));
        int kept = _options.TopK > 0 ? Math.Min(_options.TopK, n) : n;

        // Softmax over the kept candidates (in double for a stable sum).
        float max = p[order[0]];
        double sum = 0;
        var weights = _weights.AsSpan(0, kept);
        for (int i = 0; i < kept; i++) sum += weights[i] = Math.Exp(p[order[i]] - max);
        if (_options.TopP < 1f)
        {
            // Keep the smallest prefix whose mass reaches top_p (always at least one token).
            double cumulative = 0;
            int keep = kept;
            for (int i = 0; i < kept; i++)
            {
                cumulative += weights[i] / sum;
                if (cumulative >= _options.TopP) { keep = i + 1; break; }
            }
            kept = keep;
            sum = 0;
            for (int i = 0; i < kept; i++) sum += weights[i];
        }
        double r = _random.NextDouble() * sum;
        for (int i = 0; i < kept; i++)
        {
            r -= weights[i];
            if (r < 0) return order[i];
        }
        return order[kept - 1];
    }

    /// <summary>Orders token ids by descending scaled logit, lower id first on ties; a struct so sorting allocates nothing.</summary>
    private readonly struct MostLikelyFirst(float[] keys) : IComparer<int>
    {
        public int Compare(int a, int b)
        {
            int c = keys[b].CompareTo(keys[a]);
            return c != 0 ? c : a.CompareTo(b);
        }
    }

    /// <summary>Index of the largest logit; the first one on ties, like torch.argmax.</summary>
    public static int ArgMax(ReadOnlySpan<float> logits) => TensorPrimitives.IndexOfMax(logits);
}

namespace PaliGemma.Cli;

/// <summary>A usage error: printed as one line with a hint to run help, exit code 2.</summary>
public sealed class UsageException(string message) : Exception(message);

/// <summary>
/// Minimal "--name value" / "--flag" parser. Every option must be declared by the command that reads it, so a misspelt
/// option is reported instead of ignored.
/// </summary>
public sealed class ParsedArguments
{
    private readonly Dictionary<string, string?> _values = new(StringComparer.Ordinal);
    private readonly HashSet<string> _read = new(StringComparer.Ordinal);

    public ParsedArguments(IReadOnlyList<string> args, IReadOnlySet<string> flags)
    {
        for (int i = 0; i < args.Count; i++)
        {
            string arg = args[i];
            if (!arg.StartsWith("--", StringComparison.Ordinal) || arg.Length == 2)
                throw new UsageException($"unexpected argument '{arg}' (options look like --name value)");
            string name = arg[2..];
            string? value = null;
            int eq = name.IndexOf('=');
            if (eq >= 0)
            {
                value = name[(eq + 1)..];
                name = name[..eq];
            }
            else if (!flags.Contains(name))
            {
                if (i + 1 >= args.Count) throw new UsageException($"option --{name} needs a value");
                value = args[++i];
            }
            if (!_values.TryAdd(name, value)) throw new UsageException($"option --{name} is given twice");
        }
    }

    public bool Flag(string name)
    {
        _read.Add(name);
        return _values.ContainsKey(name);
    }

    public string? Optional(string name)
    {
        _read.Add(name);
        return _values.TryGetValue(name, out var v) ? v : null;
    }

    public string Required(string name) =>
        Optional(name) ?? throw new UsageException($"option --{name} is required");

    public int Int(string name, int fallback, int min, int max)
    {
        string? text = Optional(name);
        if (text is null) return fallback;
        if (!int.TryParse(text, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out int value) || value < min || value > max)
            throw new UsageException($"--{name} must be an integer between {min} and {max}, got '{text}'");
        return value;
    }

    public float Float(string name, float fallback, float min, float max)
    {
        string? text = Optional(name);
        if (text is null) return fallback;
        if (!float.TryParse(text, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out float value) || !(value >= min && value <= max))
            throw new UsageException($"--{name} must be a number between {min} and {max}, got '{text}'");
        return value;
    }

    public ulong ULong(string name, ulong fallback)
    {
        string? text = Optional(name);
        if (text is null) return fallback;
        if (!ulong.TryParse(text, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out ulong value))
            throw new UsageException($"--{name} must be a non-negative integer, got '{text}'");
        return value;
    }

    /// <summary>Fails on options nobody read: typos and options of another command.</summary>
    public void RejectUnknown()
    {
        foreach (var name in _values.Keys)
            if (!_read.Contains(name)) throw new UsageException($"unknown option --{name}");
    }
}
